"""``detloop team``: the local team stack (up, down, status) and the team's users and roles (init, add-user, users).

Exit codes as for every detloop command: 0 success, 2 bad input (a stack already runs, unknown role),
3 tracking server unreachable or refused (not the admin), 1 a service did not start (the message names it
and its log; what had started is stopped again). ``team status`` exits 1 when the recorded stack is not
(wholly) running.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

from detloop.cli.common import compose_args
from detloop.core.errors import PermissionRefused


def _reported(func):
    """Print the team commands' own failures as one ``error:`` line with their exit code, no traceback."""

    @functools.wraps(func)
    def run(args) -> int:
        from detloop.team.process import StackFailed

        try:
            return func(args)
        except (StackFailed, PermissionRefused) as err:
            print(f"error: {err}", file=sys.stderr)
            return int(err.exit_code)

    return run


def _folder(args, cfg) -> Path:
    from detloop.core.env import in_project

    return in_project(args.folder or cfg.team.state_dir)


@_reported
def cmd_team_up(args) -> int:
    from detloop.team.stack import TeamStack

    cfg = compose_args(args)
    stack = TeamStack.up(_folder(args, cfg), slurm=args.slurm, settings=cfg.team)
    for proc in stack.services:
        where = f"port {proc.port}" if proc.port else ""
        print(
            f"{proc.name:10s} pid {proc.pid:<7d} {where:11s} up in {proc.extra.get('startup_s', '?')} s  log {proc.log}"
        )
    print(f"MLflow {stack.mlflow_uri} (admin: {stack.state['admin_username']}), S3 {stack.s3_endpoint}")
    print(f"DVC remote: dvc remote add -d team {stack.state['dvc_remote']}")
    print(f"client environment: source {stack.state['env_file']}    stop: detloop team down")
    return 0


@_reported
def cmd_team_down(args) -> int:
    from detloop.team.stack import down

    cfg = compose_args(args)
    folder = _folder(args, cfg)
    stopped = down(folder)
    print(f"stopped {', '.join(stopped)}" if stopped else f"nothing was running from {folder}")
    return 0


@_reported
def cmd_team_status(args) -> int:
    from detloop.team.stack import status

    cfg = compose_args(args)
    found = status(_folder(args, cfg))
    running = found["recorded"] and all(s["running"] for s in found["services"])
    if args.json:
        print(json.dumps(found, indent=2))
        return 0 if running else 1
    if not found["recorded"]:
        print(f"no team stack is recorded in {found['folder']} (start one: detloop team up)")
        return 1
    print(f"team stack of {found['folder']}, started {found['started_at']}")
    for s in found["services"]:
        state = "running" if s["running"] else "STOPPED"
        port = s["port"] or "-"
        memory = f"RSS {s['rss_mb']:6.0f} MB PSS {s['pss_mb']:6.0f} MB"
        print(f"  {s['name']:10s} {state:8s} pid {s['pid']:<7d} port {port:<6} {memory}  {s['log']}")
    print(f"  urls: {json.dumps(found['urls'])}")
    print(f"  client environment: source {found['env_file']}")
    return 0 if running else 1


@_reported
def cmd_team_init(args) -> int:
    from detloop.team.access import init

    made = init(compose_args(args))
    created = ", ".join(made["created"]) or "nothing (all existed)"
    experiments = ", ".join(made["experiments"])
    print(f"experiments {experiments} and registered model {made['registered_model']}: created {created}")
    return 0


@_reported
def cmd_team_add_user(args) -> int:
    from detloop.team.access import add_user

    cfg = compose_args(args)
    variable = args.password_env or str(cfg.team.password_env)
    result = add_user(cfg, args.name, args.role, os.environ.get(variable))
    verb = "created" if result["created"] else "updated (password unchanged)"
    print(f"user {result['user']} {verb} as {result['role']}:")
    for grant in result["grants"]:
        print(f"  {grant['permission']:6s} on {grant['resource_type']} {grant['name']} ({grant['outcome']})")
    return 0


@_reported
def cmd_team_users(args) -> int:
    from detloop.team.access import users

    found = users(compose_args(args))
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    for user in found:
        permissions = ", ".join(f"{name}={p}" for name, p in user["permissions"].items())
        print(f"{user['user']:20s} {user['role']:9s} {permissions}")
    return 0


def add_team_parsers(sub, overrides_help: str) -> None:
    """``detloop team up|down|status|init|add-user|users``."""
    team = sub.add_parser("team", help="the local team stack (PostgreSQL, S3, MLflow with auth, SLURM) and roles")
    team_sub = team.add_subparsers(dest="team_command", required=True)
    folder_help = "the stack's state folder (default team.state_dir, build/team)"

    p = team_sub.add_parser(
        "up",
        help="start PostgreSQL, an S3 server and an MLflow server with basic auth (and --slurm) on loopback ports",
        description="Start the local team stack; writes FOLDER/stack.json (pids, ports) and FOLDER/env.sh (source it). "
        "Exit 2 if a stack runs from FOLDER already; exit 1 if a service does not start (the others are stopped).",
    )
    p.add_argument("--slurm", action="store_true", help="also a single-node SLURM (apt-get installs it when missing)")
    p.add_argument("--folder", help=folder_help)
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.set_defaults(func=cmd_team_up)

    p = team_sub.add_parser("down", help="stop every service the stack recorded (nothing else)")
    p.add_argument("--folder", help=folder_help)
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.set_defaults(func=cmd_team_down)

    p = team_sub.add_parser("status", help="what the recorded stack runs (exit 1 if it is not wholly running)")
    p.add_argument("--folder", help=folder_help)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.set_defaults(func=cmd_team_status)

    p = team_sub.add_parser(
        "init", help="as the MLflow admin: create the team's experiments and the registered model (idempotent)"
    )
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.set_defaults(func=cmd_team_init)

    p = team_sub.add_parser(
        "add-user",
        help="as the MLflow admin: create a user if missing and give it a role's permissions (idempotent)",
        description="Roles (conf/team/default.yaml): reader (READ), trainer (EDIT), reviewer (EDIT on the "
        "experiments, MANAGE on the registered model: detloop promote / rollback). The password of a new user "
        "comes from the environment variable team.password_env (DETLOOP_TEAM_PASSWORD) or --password-env.",
    )
    p.add_argument("name", help="the user name")
    p.add_argument("role", help="reader, trainer or reviewer (team.roles)")
    p.add_argument("--password-env", metavar="VAR", help="environment variable holding the new user's password")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.set_defaults(func=cmd_team_add_user)

    p = team_sub.add_parser("users", help="as the MLflow admin: every user, its role and permissions")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.set_defaults(func=cmd_team_users)
