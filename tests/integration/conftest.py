"""Integration fixtures: a real ``mlflow server`` on a free loopback port, shared by the session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import wait_healthy

from detloop.core.env import free_port


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A real tracking server with a SQLite backend and a local artifact root, stopped afterwards.

    Started once per session (about 15-20 s); tests keep apart by registered model name.
    """
    base = tmp_path_factory.mktemp("server")
    port = free_port()
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    proc = subprocess.Popen(
        [
            mlflow_bin,
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{base / 'server.db'}",
            "--artifacts-destination",
            str(base / "artifacts"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=(base / "server.log").open("w"),
    )
    uri = f"http://127.0.0.1:{port}"
    wait_healthy(uri, proc, "mlflow server", log=base / "server.log")
    yield uri
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
