"""Integration fixtures: a real ``mlflow server`` on a free loopback port, shared by the session."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
from tests.conftest import mlflow_server


@contextlib.contextmanager
def own_mongod(dbpath: Path):
    """A mongod of the caller's own (FiftyOne's binary) at ``dbpath``; yields its URI, stops it afterwards and
    puts back ``FIFTYONE_DATABASE_URI`` (``connect()`` exports the URI for the App server)."""
    from detloop.fiftyone.db import start_mongod, stop_mongod

    before = os.environ.get("FIFTYONE_DATABASE_URI")
    server = start_mongod(dbpath, detach=False)
    try:
        yield server.uri
    finally:
        stop_mongod(server)
        if before is None:
            os.environ.pop("FIFTYONE_DATABASE_URI", None)
        else:
            os.environ["FIFTYONE_DATABASE_URI"] = before


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A real tracking server with a SQLite backend and a local artifact root, stopped afterwards.

    Started once per session (about 15-20 s); tests keep apart by registered model name.
    """
    base = tmp_path_factory.mktemp("server")
    with mlflow_server(base / "server.db", base / "artifacts", base / "server.log") as uri:
        yield uri
