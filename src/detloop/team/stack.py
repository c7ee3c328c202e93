"""The local team stack: PostgreSQL 15, an S3 server (moto), ``mlflow server --app-name basic-auth``, SLURM.

``TeamStack.up(folder)`` starts every service as a process of its own session, records it in
``folder/stack.json`` and writes ``folder/env.sh`` (the client environment); ``down()`` stops what
was recorded, in reverse order, and nothing else. The stack is a try-out: moto keeps objects in
memory, so every ``up`` also starts with a fresh database. Secrets (the MLflow admin password,
Flask's secret key, the S3 keys) come from the environment or are generated into
``folder/secrets.json`` (mode 0600); they are never written anywhere else but the folder's
mode-0600 ``env.sh`` and ``mlflow-auth.ini``.

    with TeamStack.up(Path("build/team")) as stack:
        print(stack.mlflow_uri, stack.env["MLFLOW_TRACKING_PASSWORD"])
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from detloop.core.env import free_port
from detloop.core.errors import BadInput
from detloop.team import process
from detloop.team.process import Proc, StackFailed, wait_healthy

log = logging.getLogger(__name__)

STATE_FILE = "stack.json"
ENV_FILE = "env.sh"
SECRETS_FILE = "secrets.json"
AUTH_INI = "mlflow-auth.ini"
REGION = "us-east-1"
HOST = "127.0.0.1"
CLIENT_SECRETS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")

__all__ = ["MlflowServer", "StackFailed", "TeamStack", "down", "mlflow_server", "status", "up", "wait_healthy"]


def _settings(settings) -> dict:
    """``cfg.team`` as a plain dict (composed from conf/ when not given)."""
    from omegaconf import OmegaConf

    if settings is None:
        from detloop.core.config import compose

        settings = compose([]).team
    if not isinstance(settings, dict):
        settings = OmegaConf.to_container(settings, resolve=True)
    return settings


def _bin(name: str) -> str:
    """An executable of this Python environment (moto_server, mlflow), else from PATH."""
    own = Path(sys.executable).parent / name
    found = str(own) if own.is_file() else shutil.which(name)
    if not found:
        raise StackFailed(f"{name} not found beside {sys.executable} nor on PATH (pip install the project's extras)")
    return found


def write_private(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` readable by its owner only (mode 0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    return path


@contextlib.contextmanager
def _starting(name: str, log_path: Path | str) -> Iterator[None]:
    """Any error while ``name`` starts becomes a StackFailed naming the service and its log."""
    try:
        yield
    except StackFailed:
        raise
    except Exception as err:
        raise StackFailed(f"{name} failed to start: {err}; see {log_path}") from err


# --------------------------------------------------------------------------- the MLflow server


@dataclass
class MlflowServer:
    """A running ``mlflow server``: its URI, its recorded process and (when started here) its Popen."""

    uri: str
    proc: Proc
    popen: subprocess.Popen | None = None

    def stop(self, timeout: float = process.TERM_TIMEOUT) -> None:
        process.stop(self.proc, timeout=timeout, popen=self.popen)


def start_mlflow_server(
    backend_uri: str,
    artifacts: str,
    log_path: Path,
    *,
    proxied: bool = True,
    env: dict[str, str] | None = None,
    app_name: str | None = None,
    timeout: float = 180.0,
) -> MlflowServer:
    """``mlflow server`` on a free loopback port over ``backend_uri``, healthy when this returns.

    ``proxied``: the server serves the artifacts (``--artifacts-destination artifacts``), else clients
    write to ``--default-artifact-root artifacts`` themselves. ``env`` is the server's whole environment
    (default: this process's). Started in its own session; on failure it is stopped and StackFailed
    names its log.
    """
    port = free_port()
    argv = [_bin("mlflow"), "server", "--host", HOST, "--port", str(port), "--workers", "1"]
    argv += ["--backend-store-uri", backend_uri]
    argv += ["--artifacts-destination" if proxied else "--default-artifact-root", str(artifacts)]
    if app_name:
        argv += ["--app-name", app_name]
    popen, proc = process.spawn("mlflow", argv, Path(log_path), env=env, port=port)
    server = MlflowServer(f"http://{HOST}:{port}", proc, popen)
    try:
        proc.extra["startup_s"] = round(wait_healthy(server.uri, popen, "mlflow server", timeout, Path(log_path)), 1)
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts: str, log_path: Path, **kwargs) -> Iterator[MlflowServer]:
    """:func:`start_mlflow_server` for the duration of a block, stopped by process group afterwards."""
    server = start_mlflow_server(backend_uri, artifacts, log_path, **kwargs)
    try:
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- PostgreSQL


def _as_postgres() -> list[str]:
    """The prefix that runs a PostgreSQL tool: ``runuser -u postgres --`` as root (initdb refuses root)."""
    if os.geteuid() != 0:
        return []
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError as err:
        raise StackFailed("postgres: running as root needs the 'postgres' user (apt-get install postgresql)") from err
    return ["runuser", "-u", "postgres", "--"]


def _postgres_dir(folder: Path) -> tuple[Path, bool]:
    """The folder of the database (data, socket, log) and whether it is a temporary one outside ``folder``.

    As root it is owned by ``postgres``, which must be able to reach it: when ``folder`` lies below a
    folder closed to others (pytest's temp folders are 0700), it goes to a temporary folder instead.
    """
    prefix = _as_postgres()
    if not prefix or subprocess.run([*prefix, "test", "-x", str(folder)], check=False).returncode == 0:
        pgdir = folder / "postgres"
        if pgdir.exists():  # a previous stack's database: each up starts fresh (moto's objects are gone too)
            shutil.rmtree(pgdir)
        pgdir.mkdir(mode=0o700)
        temporary = False
    else:
        pgdir = Path(tempfile.mkdtemp(prefix="detloop-team-pg-"))
        temporary = True
    if prefix:
        shutil.chown(pgdir, "postgres", "postgres")
    return pgdir, temporary


def start_postgres(folder: Path, pg_bin: Path, timeout: float = 60.0) -> Proc:
    """initdb + ``pg_ctl start`` on a free loopback port (socket in the data folder); databases mlflow, mlflow_auth."""
    prefix = _as_postgres()
    for tool in ("initdb", "pg_ctl"):
        if not (pg_bin / tool).is_file():
            raise StackFailed(
                f"postgres: {pg_bin / tool} not found (apt-get install postgresql-15, or set team.postgres_bin)"
            )
    pgdir, temporary = _postgres_dir(folder)
    data, log_path, port = pgdir / "data", pgdir / "postgres.log", free_port()
    init = subprocess.run(
        [*prefix, str(pg_bin / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync"],
        capture_output=True,
        text=True,
        check=False,
        cwd=pgdir,
    )
    (folder / "logs" / "postgres-initdb.log").write_text(init.stdout + init.stderr)
    if init.returncode != 0:
        _remove_temporary(pgdir, temporary)
        raise StackFailed(f"postgres: initdb failed ({init.returncode}); see {folder / 'logs' / 'postgres-initdb.log'}")
    options = f"-p {port} -k {pgdir} -c listen_addresses={HOST} -c fsync=off"
    start = subprocess.run(
        [*prefix, str(pg_bin / "pg_ctl"), "-D", str(data), "-l", str(log_path), "-o", options]
        + ["-w", "-t", str(int(timeout)), "start"],
        capture_output=True,
        text=True,
        check=False,
        cwd=pgdir,
        start_new_session=True,
    )
    pid_file = data / "postmaster.pid"
    if start.returncode != 0 or not pid_file.is_file():
        _remove_temporary(pgdir, temporary)
        raise StackFailed(f"postgres: pg_ctl start failed: {start.stdout}{start.stderr}; see {log_path}")
    pid = int(pid_file.read_text().splitlines()[0])
    proc = process.process_of("postgres", pid, log_path, port, data=str(data), dir=str(pgdir), temporary=temporary)
    try:
        with _starting("postgres", log_path):
            import psycopg

            with psycopg.connect(f"postgresql://postgres@{HOST}:{port}/postgres", autocommit=True) as conn:
                for database in ("mlflow", "mlflow_auth"):
                    conn.execute(f"CREATE DATABASE {database}")
    except BaseException:
        stop_postgres(proc, pg_bin, process.TERM_TIMEOUT)
        raise
    return proc


def _remove_temporary(pgdir: Path, temporary: bool) -> None:
    if temporary:
        shutil.rmtree(pgdir, ignore_errors=True)


def stop_postgres(proc: Proc, pg_bin: Path, timeout: float) -> None:
    """``pg_ctl stop -m fast``; then whatever is left of the postmaster and its backends by signal."""
    data = proc.extra.get("data")
    if process.is_running(proc) and data and Path(data).is_dir():
        subprocess.run(
            [*_as_postgres(), str(pg_bin / "pg_ctl"), "-D", data, "-m", "fast", "-w", "-t", str(int(timeout)), "stop"],
            capture_output=True,
            check=False,
        )
    process.stop(proc, timeout=timeout)
    _remove_temporary(Path(proc.extra.get("dir", "")), bool(proc.extra.get("temporary")))


def pg_uri(proc: Proc, database: str = "mlflow") -> str:
    return f"postgresql://postgres@{HOST}:{proc.port}/{database}"


# --------------------------------------------------------------------------- S3 (moto)


def start_s3(folder: Path, buckets: list[str], keys: dict[str, str]) -> tuple[subprocess.Popen, Proc]:
    """``moto_server`` on a free loopback port (objects in memory) with ``buckets`` created."""
    port, log_path = free_port(), folder / "logs" / "s3.log"
    popen, proc = process.spawn("s3", [_bin("moto_server"), "-H", HOST, "-p", str(port)], log_path, port=port)
    try:
        url = f"http://{HOST}:{port}"
        proc.extra["startup_s"] = round(wait_healthy(url, popen, "S3 server (moto)", 60.0, log_path, "/moto-api/"), 1)
        with _starting("s3", log_path):
            import boto3

            client = boto3.client("s3", endpoint_url=url, region_name=REGION, **keys)
            for bucket in buckets:
                client.create_bucket(Bucket=bucket)
    except BaseException:
        process.stop(proc, popen=popen)
        raise
    return popen, proc


# --------------------------------------------------------------------------- secrets and the client environment


def _secrets(folder: Path) -> dict[str, str]:
    """The stack's secrets: from the environment, else the ones generated for this folder before, else new ones."""
    path = folder / SECRETS_FILE
    kept = json.loads(path.read_text()) if path.is_file() else {}
    generated = {
        "admin_password": kept.get("admin_password") or secrets.token_urlsafe(24),
        "flask_secret_key": kept.get("flask_secret_key") or secrets.token_hex(32),
        "aws_access_key_id": kept.get("aws_access_key_id") or "detloop" + secrets.token_hex(6),
        "aws_secret_access_key": kept.get("aws_secret_access_key") or secrets.token_urlsafe(30),
    }
    write_private(path, json.dumps(generated, indent=2) + "\n")
    return {
        **generated,
        "admin_password": os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD") or generated["admin_password"],
        "flask_secret_key": os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY") or generated["flask_secret_key"],
    }


def _aws_keys(values: dict[str, str]) -> dict[str, str]:
    return {"aws_access_key_id": values["aws_access_key_id"], "aws_secret_access_key": values["aws_secret_access_key"]}


def _auth_ini(folder: Path, admin: str, password: str, database_uri: str) -> Path:
    text = (
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {database_uri}\n"
        f"admin_username = {admin}\n"
        f"admin_password = {password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # a password check costs about a second (PBKDF2); with one worker every password change
        # goes through the worker that caches, so the cache is never stale
        "auth_cache_ttl_seconds = 300\n"
    )
    return write_private(folder / AUTH_INI, text)


def _server_env(folder: Path, values: dict[str, str], s3_url: str, auth_db: str, settings: dict) -> dict[str, str]:
    """The MLflow server's environment: S3 endpoint and keys, auth config, secret key, webhooks to loopback."""
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_SECRETS and not k.startswith("MLFLOW_AUTH_ADMIN")}
    env.update(
        MLFLOW_S3_ENDPOINT_URL=s3_url,
        AWS_ACCESS_KEY_ID=values["aws_access_key_id"],
        AWS_SECRET_ACCESS_KEY=values["aws_secret_access_key"],
        AWS_DEFAULT_REGION=REGION,
        MLFLOW_AUTH_CONFIG_PATH=str(_auth_ini(folder, settings["admin_username"], values["admin_password"], auth_db)),
        MLFLOW_FLASK_SERVER_SECRET_KEY=values["flask_secret_key"],
        MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS="true",
        MLFLOW_WEBHOOK_ALLOWED_SCHEMES="http,https",
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION=str(bool(settings.get("mlflow_jobs", False))).lower(),
    )
    return env


def client_env(state: dict, values: dict[str, str]) -> dict[str, str]:
    """What a client of the stack needs (env.sh): tracking URI and admin login, S3 endpoint and keys, SLURM_CONF."""
    env = {
        "MLFLOW_TRACKING_URI": state["urls"]["mlflow"],
        "MLFLOW_TRACKING_USERNAME": state["admin_username"],
        "MLFLOW_TRACKING_PASSWORD": values["admin_password"],
        "AWS_ACCESS_KEY_ID": values["aws_access_key_id"],
        "AWS_SECRET_ACCESS_KEY": values["aws_secret_access_key"],
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL": state["urls"]["s3"],
    }
    if state.get("slurm_conf"):
        env["SLURM_CONF"] = state["slurm_conf"]
    return env


def _write_env_sh(folder: Path, state: dict, env: dict[str, str]) -> Path:
    lines = [
        f"# detloop team stack started {state['started_at']} from {folder}; `detloop team down` stops it.",
        "# MLflow: the admin login; another user: export MLFLOW_TRACKING_USERNAME=... MLFLOW_TRACKING_PASSWORD=...",
        f"# DVC: dvc remote add -d team {state['dvc_remote']}   (endpoint and keys from AWS_* below)",
        *(f"export {key}={shlex.quote(value)}" for key, value in env.items()),
    ]
    return write_private(folder / ENV_FILE, "\n".join(lines) + "\n")


# --------------------------------------------------------------------------- the stack


class TeamStack:
    """The recorded local team stack in ``folder`` (see :meth:`up`, :meth:`load`, :meth:`down`)."""

    def __init__(self, folder: Path, state: dict, popens: dict[str, subprocess.Popen] | None = None):
        self.folder = Path(folder)
        self.state = state
        self._procs = [Proc.from_dict(s) for s in state["services"]]
        self._popens = dict(popens or {})

    # ----------------------------------------------------------------- reading
    @property
    def services(self) -> list[Proc]:
        return list(self._procs)

    def service(self, name: str) -> Proc:
        return next(p for p in self.services if p.name == name)

    @property
    def mlflow_uri(self) -> str:
        return self.state["urls"]["mlflow"]

    @property
    def s3_endpoint(self) -> str:
        return self.state["urls"]["s3"]

    @property
    def pg_uri(self) -> str:
        return self.state["urls"]["postgres"]

    @property
    def slurm_conf(self) -> str | None:
        return self.state.get("slurm_conf")

    @property
    def env(self) -> dict[str, str]:
        """The client environment (what ``env.sh`` exports)."""
        return client_env(self.state, _read_secrets(self.folder))

    def running(self) -> dict[str, bool]:
        """Service name -> whether its recorded process still runs."""
        return {p.name: process.is_running(p) for p in self.services}

    def rss_mb(self, field: str = "Rss") -> dict[str, float]:
        """Service name -> resident memory (MB) of all its processes: ``Rss`` counts shared pages in each
        process, ``Pss`` shares them out (the sum over services is what the stack takes)."""
        return {p.name: round(_memory_kb(process.members(p)[0], field) / 1024, 1) for p in self.services}

    # ----------------------------------------------------------------- life cycle
    @classmethod
    def up(cls, folder: Path | str, *, slurm: bool = False, settings=None) -> TeamStack:
        """Start the stack recorded in ``folder``; BadInput if one runs there already.

        ``settings``: ``cfg.team`` (default: composed from conf/). If a service fails to start, the
        ones already started are stopped and StackFailed names the service and its log.
        """
        folder = Path(folder).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "logs").mkdir(exist_ok=True)
        with _lock(folder):
            existing = _load_state(folder)
            if existing is not None:
                alive = [p.name for p in cls(folder, existing).services if process.is_running(p)]
                if alive:
                    raise BadInput(
                        f"a team stack already runs from {folder}",
                        [f"running: {', '.join(alive)}", "stop it first: detloop team down"],
                    )
                log.warning("replacing the record of a stopped stack in %s", folder / STATE_FILE)
            stack = cls(folder, _new_state(folder, _settings(settings)))
            try:
                stack._start_all(slurm)
            except BaseException:
                stack._stop_all()
                (folder / STATE_FILE).unlink(missing_ok=True)
                raise
        return stack

    @classmethod
    def load(cls, folder: Path | str) -> TeamStack:
        """The stack recorded in ``folder`` (BadInput if there is no record)."""
        folder = Path(folder).resolve()
        state = _load_state(folder)
        if state is None:
            raise BadInput(f"no team stack is recorded in {folder}", ["start one: detloop team up"])
        return cls(folder, state)

    def down(self) -> list[str]:
        """Stop every recorded service (reverse start order); return the names that were running."""
        with _lock(self.folder):
            stopped = self._stop_all()
            (self.folder / STATE_FILE).unlink(missing_ok=True)
            (self.folder / ENV_FILE).unlink(missing_ok=True)
        return stopped

    def __enter__(self) -> TeamStack:
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    # ----------------------------------------------------------------- internals
    def _record(self, proc: Proc, popen: subprocess.Popen | None = None) -> None:
        """Add a started service to the record (saved at once, so a later down finds it whatever happens)."""
        self._procs.append(proc)
        if popen is not None:
            self._popens[proc.name] = popen
        self._save()

    def _save(self) -> None:
        self.state["services"] = [p.to_dict() for p in self._procs]
        _save_state(self.folder, self.state)

    def _start_all(self, slurm: bool) -> None:
        settings = self.state["settings"]
        values = _secrets(self.folder)
        t0 = time.monotonic()
        postgres = start_postgres(self.folder, Path(settings["postgres_bin"]))
        postgres.extra["startup_s"] = round(time.monotonic() - t0, 1)
        self._record(postgres)
        self.state["urls"]["postgres"] = pg_uri(postgres)

        buckets = [settings["buckets"]["artifacts"], settings["buckets"]["dvc"]]
        popen, s3 = start_s3(self.folder, buckets, _aws_keys(values))
        self._record(s3, popen)
        self.state["urls"]["s3"] = f"http://{HOST}:{s3.port}"

        env = _server_env(self.folder, values, self.state["urls"]["s3"], pg_uri(postgres, "mlflow_auth"), settings)
        server = start_mlflow_server(
            pg_uri(postgres),
            self.state["artifacts_destination"],
            self.folder / "logs" / "mlflow.log",
            env=env,
            app_name="basic-auth",
            timeout=float(settings["timeouts"]["mlflow"]),
        )
        self._record(server.proc, server.popen)
        self.state["urls"]["mlflow"] = server.uri

        if slurm:
            from detloop.team import slurm as slurm_node

            self.state["slurm_conf"] = str(slurm_node.start(self.folder, settings["slurm"], self._record))
        self.state["env_file"] = str(_write_env_sh(self.folder, self.state, client_env(self.state, values)))
        self._save()

    def _stop_all(self) -> list[str]:
        settings = self.state.get("settings", {})
        timeout = float(settings.get("timeouts", {}).get("stop", process.TERM_TIMEOUT))
        pg_bin = Path(settings.get("postgres_bin", "/usr/lib/postgresql/15/bin"))
        stopped, failures = [], []
        conf = self.state.get("slurm_conf")
        if conf and any(p.name == "slurmctld" and process.is_running(p) for p in self.services):
            from detloop.team import slurm as slurm_node

            slurm_node.stop_jobs(Path(conf))  # jobs first: their steps live outside the daemons' groups
        for proc in reversed(self.services):
            was_running = process.is_running(proc)
            try:
                if proc.name == "postgres":
                    stop_postgres(proc, pg_bin, timeout)
                else:
                    process.stop(proc, timeout=timeout, popen=self._popens.get(proc.name))
            except StackFailed as err:
                failures.append(str(err))
                continue
            if was_running:
                stopped.append(proc.name)
        if conf:
            from detloop.team import slurm as slurm_node

            if slurm_node.kill_leftovers(Path(conf)):
                stopped.append("slurm job steps")
        if failures:
            raise StackFailed("could not stop: " + "; ".join(failures))
        return stopped


def _memory_kb(pids, field: str) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith(f"{field}:"):
                    total += int(line.split()[1])
    return total


def _new_state(folder: Path, settings: dict) -> dict:
    buckets = settings["buckets"]
    return {
        "format": 1,
        "folder": str(folder),
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "admin_username": settings["admin_username"],
        "artifacts_destination": f"s3://{buckets['artifacts']}/mlflow",
        "dvc_remote": f"s3://{buckets['dvc']}/dvc",
        "urls": {},
        "slurm_conf": None,
        "env_file": None,
        "services": [],
        "settings": settings,
    }


def _load_state(folder: Path) -> dict | None:
    path = folder / STATE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BadInput(f"unreadable team stack record {path}", [str(err)]) from err


def _save_state(folder: Path, state: dict) -> None:
    tmp = folder / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(folder / STATE_FILE)


def _read_secrets(folder: Path) -> dict[str, str]:
    values = json.loads((folder / SECRETS_FILE).read_text())
    values["admin_password"] = os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD") or values["admin_password"]
    return values


@contextlib.contextmanager
def _lock(folder: Path) -> Iterator[None]:
    """One ``up`` or ``down`` at a time per folder (BadInput when another holds it)."""
    import fcntl

    with open(folder / ".lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise BadInput(f"another detloop team up/down is working on {folder}", ["wait for it, then retry"]) from err
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- module-level commands


def up(folder: Path | str, *, slurm: bool = False, settings=None) -> TeamStack:
    return TeamStack.up(folder, slurm=slurm, settings=settings)


def down(folder: Path | str) -> list[str]:
    """Stop the stack recorded in ``folder``; [] when none is recorded."""
    folder = Path(folder).resolve()
    if _load_state(folder) is None:
        return []
    return TeamStack.load(folder).down()


def status(folder: Path | str) -> dict:
    """What the record in ``folder`` says and what of it runs (``{"recorded": False}`` without a record)."""
    folder = Path(folder).resolve()
    state = _load_state(folder)
    if state is None:
        return {"recorded": False, "folder": str(folder)}
    stack = TeamStack(folder, state)
    rss, pss = stack.rss_mb(), stack.rss_mb("Pss")
    services = [
        {"name": p.name, "pid": p.pid, "pgid": p.pgid, "port": p.port, "running": process.is_running(p),
         "rss_mb": rss[p.name], "pss_mb": pss[p.name], "startup_s": p.extra.get("startup_s"), "log": p.log}
        for p in stack.services
    ]  # fmt: skip
    return {
        "recorded": True,
        "folder": str(folder),
        "started_at": state["started_at"],
        "urls": state["urls"],
        "env_file": state.get("env_file"),
        "slurm_conf": state.get("slurm_conf"),
        "services": services,
    }
