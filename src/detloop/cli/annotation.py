"""``detloop annotation install|up|down|status``: the local Label Studio server of ``detloop review annotate``.

It runs from a virtualenv of its own (``fiftyone.review.annotation.labelstudio.venv``; Label Studio pins
Django, which stays out of the project's environment), on 127.0.0.1, started and stopped by pid. Exit codes:
0 success, 2 bad input, 1 the server could not be installed or started (the message names its log);
``annotation status`` exits 1 when the server is not running.
"""

from __future__ import annotations

import json

from detloop.cli.common import compose_args


def _settings(args):
    from detloop.fiftyone.labelstudio import Settings

    return Settings.of(compose_args(args))


def cmd_annotation_install(args) -> int:
    from detloop.fiftyone.labelstudio import install

    s = _settings(args)
    done = install(s)
    print(f"label-studio=={s.version} {'installed' if done else 'already installed'} in {s.venv}")
    return 0


def cmd_annotation_up(args) -> int:
    from detloop.fiftyone.labelstudio import SECRETS_FILE, up

    s = _settings(args)
    state = up(s)
    how = "already running" if state.get("already_running") else f"up in {state['startup_s']} s"
    print(f"Label Studio {state['version']} {how}: {state['url']}  (pid {state['proc']['pid']}, log {state['log']})")
    print(f"  login {state['username']}; password and API key in {s.dir / SECRETS_FILE} (mode 0600)")
    print("  send the inbox: detloop review annotate    stop: detloop annotation down")
    return 0


def cmd_annotation_down(args) -> int:
    from detloop.fiftyone.labelstudio import down

    s = _settings(args)
    stopped = down(s)
    print(f"stopped Label Studio of {s.dir}" if stopped else f"no Label Studio was running from {s.dir}")
    return 0


def cmd_annotation_status(args) -> int:
    from detloop.fiftyone.labelstudio import status

    found = status(_settings(args))
    if args.json:
        print(json.dumps(found, indent=2))
    else:
        state = f"running at {found['url']} (pid {found['pid']})" if found["running"] else "not running"
        print(f"Label Studio {found['version']}: {state}; installed: {found['installed']} ({found['venv']})")
        print(f"  login {found['username']} (password and API key: {found['secrets']}); data {found['data']}")
    return 0 if found["running"] else 1


def add_annotation_parsers(sub, overrides_help: str) -> None:
    """``detloop annotation install|up|down|status``."""
    annotation = sub.add_parser(
        "annotation", help="the local Label Studio server for `detloop review annotate` (its own virtualenv)"
    )
    annotation_sub = annotation.add_subparsers(dest="annotation_command", required=True)
    commands = {
        "install": (cmd_annotation_install, "create the server's virtualenv and install label-studio (once)"),
        "up": (
            cmd_annotation_up,
            "start Label Studio on 127.0.0.1 (installing it first when needed); the admin account and API token "
            "are generated on the first start",
        ),
        "down": (cmd_annotation_down, "stop the server that `up` started (by pid); its data is kept"),
        "status": (cmd_annotation_status, "is it installed and running, where (exit 1 when not running)"),
    }
    for name, (func, text) in commands.items():
        p = annotation_sub.add_parser(name, help=text, description=text)
        if name == "status":
            p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument("overrides", nargs="*", help=overrides_help)
        p.set_defaults(func=func)
