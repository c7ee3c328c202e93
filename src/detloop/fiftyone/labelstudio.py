"""Label Studio for ``detloop review annotate``: the local server in a virtualenv of its own, and the
URL and API key that FiftyOne's ``labelstudio`` backend gets.

Label Studio pins Django and a label-studio-sdk newer than the one the project holds, so the server
lives in its own virtualenv (``fiftyone.review.annotation.labelstudio.venv``, built by :func:`install`
with the lock ``labelstudio-constraints.txt``); the project's environment holds only label-studio-sdk
2.0.19, whose legacy ``label_studio_sdk.Client`` is what FiftyOne 1.22's backend calls.

:func:`up` starts ``label-studio start`` in a session of its own on a loopback port and records it
(``server.json``: pid, start time, URL). On the first start Label Studio creates the admin account with
a generated password and API token (``secrets.json``, mode 0600) in an organization with *legacy* API
tokens enabled: FiftyOne's backend sends ``Authorization: Token KEY``, and Label Studio 1.23 refuses
legacy tokens unless the organization enables them (it does not for new organizations by default).
:func:`down` stops what was recorded, by pid and process group, and nothing else. The server's database
and uploads (``data/``) stay: the reviewers' work survives a restart. Offline by construction: the
server's update check, analytics and Sentry reporting (server and page) are off.

:func:`credentials` finds the server a command talks to: ``FIFTYONE_LABELSTUDIO_URL`` and
``FIFTYONE_LABELSTUDIO_API_KEY`` (e.g. a team's server) when set, else the running local server.
:func:`check` and :func:`talking_to` turn a server that does not answer or a refused key into a
BadInput naming the URL, where the key came from and what to do.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from detloop.core.env import free_port, in_project
from detloop.core.errors import BadInput
from detloop.team import process
from detloop.team.process import StackFailed

log = logging.getLogger(__name__)

SERVER_FILE = "server.json"  # pid, start time, port, URL of the running server (kept, as stopped, after down)
SECRETS_FILE = "secrets.json"  # username, password, api_key (mode 0600)
LOG_FILE = "server.log"
STAMP = ".detloop-installed"  # in the venv: the version and constraints it was installed with
TEMPLATE = "detloop-template"  # in the venv: an empty migrated database, copied into a new server's data/
DATABASE = "label_studio.sqlite3"
ENV_URL, ENV_KEY = "FIFTYONE_LABELSTUDIO_URL", "FIFTYONE_LABELSTUDIO_API_KEY"
# what the server process keeps of this environment (Label Studio reads many bare names: HOST, PORT, DEBUG, ...)
KEPT_ENV = ("HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "SSL_CERT_FILE", "SSL_CERT_DIR")
OFFLINE_ENV = {
    "LATEST_VERSION_CHECK": "false",
    "COLLECT_ANALYTICS": "false",
    "SENTRY_DSN": "",
    "FRONTEND_SENTRY_DSN": "",
}


class ServerFailed(StackFailed):
    """The Label Studio server could not be installed, started or stopped (exit 1); the message names its log."""


@dataclass(frozen=True)
class Settings:
    """``fiftyone.review.annotation.labelstudio`` with its paths made absolute."""

    version: str
    constraints: Path
    venv: Path
    dir: Path
    host: str
    port: int
    username: str
    start_timeout: float

    @classmethod
    def of(cls, cfg: DictConfig) -> Settings:
        s = cfg.fiftyone.review.annotation.labelstudio
        return cls(
            str(s.version),
            in_project(s.constraints),
            in_project(s.venv),
            in_project(s.dir),
            str(s.host),
            int(s.port),
            str(s.username),
            float(s.start_timeout),
        )

    @property
    def executable(self) -> Path:
        return self.venv / "bin" / "label-studio"

    @property
    def data(self) -> Path:
        return self.dir / "data"


@dataclass(frozen=True)
class Credentials:
    """Where FiftyOne's backend reaches Label Studio, and where that came from (for error messages)."""

    url: str
    api_key: str
    source: str
    local: bool

    def kwargs(self) -> dict:
        """The keyword arguments of ``annotate`` / ``load_annotations`` / ``load_annotation_results``."""
        return {"url": self.url, "api_key": self.api_key}


# --------------------------------------------------------------------------- the server's virtualenv


def _stamp(s: Settings) -> dict:
    text = s.constraints.read_bytes() if s.constraints.is_file() else b""
    return {"version": s.version, "constraints_sha256": hashlib.sha256(text).hexdigest()}


def is_installed(s: Settings) -> bool:
    """Is ``label-studio==version`` installed in the venv with the current constraints?"""
    stamp = s.venv / STAMP
    if not (s.executable.is_file() and (s.venv / TEMPLATE / DATABASE).is_file() and stamp.is_file()):
        return False
    return json.loads(stamp.read_text()) == _stamp(s)


def install(s: Settings) -> bool:
    """Create the server's virtualenv and install ``label-studio==version`` into it (nothing when it is there).

    pip runs with ``PIP_CONSTRAINT=`` so that a machine-wide constraints file (pip config ``global.constraint``)
    does not apply to this environment; ``constraints`` is its lock. Returns True when it installed.
    """
    if is_installed(s):
        return False
    if not s.constraints.is_file():
        raise BadInput(f"fiftyone.review.annotation.labelstudio.constraints: {s.constraints} not found")
    print(f"installing label-studio=={s.version} into {s.venv} (its own virtualenv: ~1 GB, about a minute)")
    python = s.venv / "bin" / "python"
    started = time.monotonic()
    steps = [
        [sys.executable, "-m", "venv", str(s.venv)],
        [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
        + ["-c", str(s.constraints), f"label-studio=={s.version}"],
    ]
    env = {**os.environ, "PIP_CONSTRAINT": "", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    for argv in steps:
        if argv[0] == sys.executable and python.is_file():
            continue
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = "\n".join(line for line in (done.stdout + done.stderr).splitlines() if "Location" not in line)
            raise ServerFailed(
                f"Label Studio: `{' '.join(argv[:5])} ...` failed (exit {done.returncode}); the package index "
                f"must be reachable to build {s.venv}:\n{tail[-2000:]}"
            )
    if not s.executable.is_file():
        raise ServerFailed(f"Label Studio: {s.executable} is missing after installing label-studio=={s.version}")
    _migrate_template(s)
    (s.venv / STAMP).write_text(json.dumps(_stamp(s)) + "\n")
    log.info("label-studio %s installed into %s in %.0f s", s.version, s.venv, time.monotonic() - started)
    return True


def _migrate_template(s: Settings) -> None:
    """An empty, migrated Label Studio database in the venv (``TEMPLATE``): a new server's ``data/`` starts
    from a copy, so its first start takes seconds instead of the ~25 s of Label Studio's migrations."""
    import shutil

    folder = s.venv / TEMPLATE
    shutil.rmtree(folder, ignore_errors=True)
    env = {k: os.environ[k] for k in KEPT_ENV if k in os.environ}
    env.update(OFFLINE_ENV, PATH=f"{s.venv / 'bin'}{os.pathsep}/usr/bin:/bin", LABEL_STUDIO_BASE_DATA_DIR=str(folder))
    argv = [str(s.executable), "version", "--data-dir", str(folder)]  # migrates the database, prints, exits
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not (folder / DATABASE).is_file():
        raise ServerFailed(
            f"Label Studio: `label-studio version` did not migrate {folder / DATABASE}:\n{done.stderr[-2000:]}"
        )
    for extra in folder.iterdir():  # keep the database alone (.env holds a secret key: each server makes its own)
        if extra.name != DATABASE:
            shutil.rmtree(extra) if extra.is_dir() else extra.unlink()


# --------------------------------------------------------------------------- the server: up, down, status


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_private(path: Path, data: dict) -> None:
    """``data`` as JSON, readable by its owner only (mode 0600), replaced atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def server_secrets(s: Settings) -> dict:
    """The admin account and API token (generated on first use; ``secrets.json``, mode 0600).

    The token is a legacy Label Studio token (40 hex characters, the length of its token keys).
    """
    path = s.dir / SECRETS_FILE
    found = _read(path)
    if not found:
        if (s.data / DATABASE).is_file():
            raise BadInput(
                f"{path}: missing, but {s.data} holds a Label Studio database made with other credentials",
                [f"put secrets.json back, or move {s.data} aside (its projects are then gone) and start again"],
            )
        s.dir.mkdir(parents=True, exist_ok=True)
        found = {"username": s.username, "password": secrets.token_urlsafe(18), "api_key": secrets.token_hex(20)}
        _write_private(path, found)
    return found


def running(s: Settings) -> tuple[dict, process.Proc] | None:
    """(state, process) of the recorded server while it runs; None otherwise."""
    state = _read(s.dir / SERVER_FILE)
    if not state.get("proc"):
        return None
    proc = process.Proc.from_dict(state["proc"])
    return (state, proc) if process.is_running(proc) else None


def _server_env(s: Settings, found: dict) -> dict[str, str]:
    env = {k: os.environ[k] for k in KEPT_ENV if k in os.environ}
    env["PATH"] = f"{s.venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"
    env.update(OFFLINE_ENV)
    env["LABEL_STUDIO_BASE_DATA_DIR"] = str(s.data)
    # the first start creates this account and token (read from the environment, not the command line)
    env["LABEL_STUDIO_USERNAME"] = found["username"]
    env["LABEL_STUDIO_PASSWORD"] = found["password"]
    env["LABEL_STUDIO_USER_TOKEN"] = found["api_key"]
    return env


def _port(s: Settings) -> int:
    if s.port:
        return s.port
    last = int(_read(s.dir / SERVER_FILE).get("port") or 0)
    if last:
        import socket

        with contextlib.suppress(OSError), socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds (TIME_WAIT is free)
            sock.bind((s.host, last))
            return last
    return free_port()


def up(s: Settings) -> dict:
    """Start the server (installing it first when needed); returns its state. A running one is reused."""
    found = running(s)
    if found is not None:
        return {**found[0], "already_running": True}
    install(s)
    account = server_secrets(s)
    s.data.mkdir(parents=True, exist_ok=True)
    if not (s.data / DATABASE).is_file() and (s.venv / TEMPLATE / DATABASE).is_file():
        import shutil

        shutil.copyfile(s.venv / TEMPLATE / DATABASE, s.data / DATABASE)
    port = _port(s)
    url = f"http://{s.host}:{port}"
    argv = [str(s.executable), "start", "--no-browser", "--internal-host", s.host, "--port", str(port)]
    argv += ["--data-dir", str(s.data), "--enable-legacy-api-token"]
    log_path = s.dir / LOG_FILE
    popen, proc = process.spawn("labelstudio", argv, log_path, env=_server_env(s, account), cwd=s.dir, port=port)
    try:
        startup = process.wait_healthy(url, popen, "Label Studio", s.start_timeout, log_path, path="/health")
        check(Credentials(url, account["api_key"], f"{s.dir / SECRETS_FILE}", local=True))
    except BaseException as err:
        process.stop(proc, popen=popen)
        if isinstance(err, StackFailed | BadInput):
            raise ServerFailed(f"Label Studio did not start: {err}") from err
        raise
    state = {
        "url": url,
        "port": port,
        "version": s.version,
        "username": account["username"],
        "started_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "startup_s": round(startup, 1),
        "log": str(log_path),
        "proc": proc.to_dict(),
    }
    _write_private(s.dir / SERVER_FILE, state)
    log.info("Label Studio %s up at %s in %.1f s (pid %d)", s.version, url, startup, proc.pid)
    return state


def down(s: Settings) -> bool:
    """Stop the recorded server (its process group and descendants); True when one was running."""
    state = _read(s.dir / SERVER_FILE)
    if not state.get("proc"):
        return False
    stopped = process.stop(process.Proc.from_dict(state["proc"]))
    kept = {k: state[k] for k in ("url", "port", "version", "username") if k in state}
    _write_private(s.dir / SERVER_FILE, {**kept, "stopped_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")})
    return stopped


def status(s: Settings) -> dict:
    """What is installed and running, and where its files are (no secret in it)."""
    found = running(s)
    state = found[0] if found else _read(s.dir / SERVER_FILE)
    return {
        "installed": is_installed(s),
        "venv": str(s.venv),
        "version": s.version,
        "running": found is not None,
        "url": state.get("url") if found else None,
        "pid": found[1].pid if found else None,
        "username": state.get("username") or s.username,
        "secrets": str(s.dir / SECRETS_FILE),
        "data": str(s.data),
        "log": str(s.dir / LOG_FILE),
    }


# --------------------------------------------------------------------------- credentials and clear errors


def credentials(cfg: DictConfig) -> Credentials:
    """Label Studio's URL and API key: from the environment when set, else from the running local server."""
    url, key = os.environ.get(ENV_URL), os.environ.get(ENV_KEY)
    if url or key:
        if not (url and key):
            raise BadInput(
                f"{ENV_URL} and {ENV_KEY}: set both (your Label Studio's URL and API key), "
                "or neither to use the local server of `detloop annotation up`"
            )
        return Credentials(url.rstrip("/"), key, f"the environment ({ENV_URL}, {ENV_KEY})", local=False)
    s = Settings.of(cfg)
    found = running(s)
    if found is None:
        was = _read(s.dir / SERVER_FILE)
        state = "is not running" if was else "has not been started"
        raise BadInput(
            f"Label Studio: the local server of {s.dir} {state} and {ENV_URL} is not set; nothing was changed",
            [
                "start it: detloop annotation up   (or make labelstudio-up); the reviewers' work in it is kept "
                f"in {s.data}",
                f"or use your own Label Studio: export {ENV_URL}=http://HOST:PORT {ENV_KEY}=<legacy token>",
            ],
        )
    account = _read(s.dir / SECRETS_FILE)
    return Credentials(found[0]["url"], account.get("api_key", ""), str(s.dir / SECRETS_FILE), local=True)


def _todo(creds: Credentials, refused: bool) -> list[str]:
    if not refused:
        if creds.local:
            return ["start it again: detloop annotation up   (the reviewers' work in it is kept)"]
        return [f"check {ENV_URL}={creds.url}, or unset {ENV_URL} and {ENV_KEY} to use `detloop annotation up`"]
    if creds.local:
        return [
            f"{creds.source} does not hold this server's token: its database was made with other credentials; "
            "stop it (detloop annotation down), move its data/ aside (its projects are then gone), start it again"
        ]
    return [
        f"{ENV_KEY} must be a legacy token of that server (Account & Settings > Legacy Token): FiftyOne 1.22's "
        "labelstudio backend sends it as 'Authorization: Token KEY'; a Personal Access Token does not work with it",
        "legacy tokens must be enabled for the organization (Organization > Settings > Access Token Settings); "
        "Label Studio 1.23 leaves them off for new organizations (`detloop annotation up` turns them on)",
    ]


def _reason(err: BaseException) -> str:
    from detloop.core.failures import reason

    return reason(err)


def check(creds: Credentials, timeout: float = 10.0) -> None:
    """BadInput (nothing changed) when the server does not answer or refuses the key."""
    import requests

    try:
        health = requests.get(f"{creds.url}/health", timeout=timeout)
        whoami = requests.get(
            f"{creds.url}/api/current-user/whoami", headers={"Authorization": f"Token {creds.api_key}"}, timeout=timeout
        )
    except requests.RequestException as err:
        raise BadInput(
            f"Label Studio at {creds.url} does not answer ({_reason(err)}); nothing was changed",
            _todo(creds, refused=False),
        ) from err
    if not health.ok:
        raise BadInput(
            f"Label Studio at {creds.url} answered /health with HTTP {health.status_code}; nothing was changed",
            _todo(creds, refused=False),
        )
    if whoami.status_code in (401, 403):
        raise BadInput(
            f"Label Studio at {creds.url} refused the API key from {creds.source} (HTTP {whoami.status_code}: "
            f"{_detail(whoami)}); nothing was changed",
            _todo(creds, refused=True),
        )
    if not whoami.ok:
        raise BadInput(
            f"Label Studio at {creds.url} answered HTTP {whoami.status_code} ({_detail(whoami)}); nothing was changed"
        )


def _detail(response) -> str:
    with contextlib.suppress(ValueError, AttributeError):
        return str(response.json().get("detail") or response.text)[:200]
    return response.text[:200]


@contextlib.contextmanager
def talking_to(creds: Credentials, action: str) -> Iterator[None]:
    """A lost server or a refused key inside the block (FiftyOne's backend, the SDK) becomes a BadInput."""
    import requests

    try:
        yield
    except requests.HTTPError as err:
        response = err.response
        status = getattr(response, "status_code", None)
        refused = status in (401, 403)
        what = f"refused the API key from {creds.source}" if refused else f"answered HTTP {status}"
        detail = _detail(response) if response is not None else str(err)
        raise BadInput(f"Label Studio at {creds.url} {what} while {action} ({detail})", _todo(creds, refused)) from err
    except requests.RequestException as err:
        raise BadInput(
            f"Label Studio at {creds.url} stopped answering while {action} ({_reason(err)})", _todo(creds, False)
        ) from err


def submitted(creds: Credentials, project_id: int, tasks: dict[int, str]) -> set[str]:
    """The sample ids (values of ``tasks``: task id -> sample id) whose task has a submitted annotation
    that was not skipped (Label Studio's Submit; Skip records a cancelled one)."""
    from label_studio_sdk import Client

    with talking_to(creds, f"reading the tasks of project {project_id}"):
        project = Client(creds.url, creds.api_key).get_project(project_id)
        found = project.get_tasks(selected_ids=list(tasks))
    return {
        tasks[t["id"]]
        for t in found
        if t["id"] in tasks and any(not a.get("was_cancelled") for a in t.get("annotations") or [])
    }
