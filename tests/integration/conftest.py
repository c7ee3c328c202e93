"""Integration fixtures: a real ``mlflow server`` on a free loopback port, shared by the session."""

from __future__ import annotations

import pytest
from tests.conftest import mlflow_server


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A real tracking server with a SQLite backend and a local artifact root, stopped afterwards.

    Started once per session (about 15-20 s); tests keep apart by registered model name.
    """
    base = tmp_path_factory.mktemp("server")
    with mlflow_server(base / "server.db", base / "artifacts", base / "server.log") as uri:
        yield uri
