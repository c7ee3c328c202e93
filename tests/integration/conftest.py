"""Integration fixtures: a real ``mlflow server`` on a free loopback port, shared by the session."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A real tracking server with a SQLite backend and a local artifact root, stopped afterwards.

    Started once per session (about 15-20 s); tests keep apart by registered model name.
    """
    base = tmp_path_factory.mktemp("server")
    port = free_port()
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    proc = subprocess.Popen(
        [mlflow_bin, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{base / 'server.db'}",
         "--artifacts-destination", str(base / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if requests.get(f"{uri}/health", timeout=2).ok:
                break
        except requests.RequestException:
            time.sleep(1)
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {proc.stderr.read().decode()[-2000:]}")
    else:
        proc.kill()
        raise RuntimeError("mlflow server did not answer /health within 120 s")
    yield uri
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
