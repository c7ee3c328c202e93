"""Where the tracking store is, and its registered versions read without importing MLflow.

``import mlflow`` and MLflow's SQLAlchemy store cost 1-2 s per process, more than the whole work of a
stage such as ``mix``, which only needs the registered versions' tags. For the project's own SQLite
store (the default) :func:`sqlite_versions` reads them with Python's ``sqlite3`` in read-only mode, the
same rows MLflow's ``search_model_versions`` returns. It does so only when the database's schema is the
one the pinned MLflow writes (its Alembic revision, :data:`SCHEMA_REVISIONS`); for any other schema, and
for every other store (a server, PostgreSQL), callers go through MLflow's own client.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from detloop.core.env import in_project
from detloop.core.errors import BadInput, TrackingUnavailable

# Alembic revisions of MLflow's tracking schema whose model_versions / model_version_tags tables
# this module reads (mlflow 3.17.2 writes dc11669786a5; a test checks it is the installed MLflow's head)
SCHEMA_REVISIONS = frozenset({"dc11669786a5"})
# MLflow marks a deleted version with this stage until its row goes (search_model_versions skips it)
DELETED_STAGE = "Deleted_Internal"
# the workspace of a store without MLflow workspaces
DEFAULT_WORKSPACE = "default"


def store_dir(cfg: DictConfig, root: Path | None = None) -> Path:
    return in_project(cfg.mlflow.store_dir, root)


def tracking_uri(cfg: DictConfig, root: Path | None = None) -> str:
    """The configured tracking URI; by default the project's SQLite store under ``mlflow.store_dir``."""
    uri = cfg.mlflow.tracking_uri
    if uri:
        return str(uri)
    if cfg.mlflow.get("require_server"):
        raise BadInput(
            "mlflow.require_server=true (the team profile, mlflow=server) needs a tracking server, and none is set",
            [
                "MLFLOW_TRACKING_URI: set it to the team's server, e.g. export MLFLOW_TRACKING_URI=https://mlflow.example.org",
                "or leave the team profile (mlflow=default) to use the project's local SQLite store",
            ],
        )
    return f"sqlite:///{store_dir(cfg, root) / 'mlflow.db'}"


def default_artifact_root(cfg: DictConfig, root: Path | None = None) -> str | None:
    """Artifact folder for experiments in the project's own store (None elsewhere: the server decides).

    ``mlflow.set_tracking_uri`` exports ``MLFLOW_TRACKING_URI``, which ``mlflow.tracking_uri`` reads,
    so after setup the key names the project's own store explicitly: that still counts as our store.
    """
    own = f"sqlite:///{store_dir(cfg, root) / 'mlflow.db'}"
    if cfg.mlflow.tracking_uri and str(cfg.mlflow.tracking_uri) != own:
        return None
    return (store_dir(cfg, root) / "artifacts").as_uri()


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; None for other stores and in-memory SQLite."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path).expanduser()


@dataclass(frozen=True)
class VersionRow:
    """The fields of an MLflow ``ModelVersion`` that detloop's read-only checks use (same names)."""

    name: str
    version: str
    creation_timestamp: int
    current_stage: str | None = None
    run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


def sqlite_versions(uri: str, name: str) -> list[VersionRow] | None:
    """Every version of registered model ``name`` in a SQLite store, read directly; None: ask MLflow.

    None when ``uri`` is not a SQLite file or its schema is not one this module knows. An absent
    database file holds no versions (``[]``): nothing has been registered yet. A file that is not a
    readable SQLite database raises TrackingUnavailable naming it, as MLflow's own store would.
    """
    path = sqlite_file(uri)
    if path is None:
        return None
    if not path.exists():
        return []
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error as err:
        raise TrackingUnavailable(f"MLflow tracking store {uri} is unreachable: {err}") from err
    try:
        with db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not tables:
                return []  # an empty file: MLflow has not created its schema yet
            if "alembic_version" not in tables:
                return None
            revisions = {row[0] for row in db.execute("SELECT version_num FROM alembic_version")}
            if not revisions or not revisions <= SCHEMA_REVISIONS:
                return None
            rows = db.execute(
                "SELECT version, creation_time, current_stage, run_id FROM model_versions"
                " WHERE workspace = ? AND name = ? AND (current_stage IS NULL OR current_stage != ?)",
                (DEFAULT_WORKSPACE, name, DELETED_STAGE),
            ).fetchall()
            tags: dict[int, dict[str, str]] = {}
            for version, key, value in db.execute(
                "SELECT version, key, value FROM model_version_tags WHERE workspace = ? AND name = ?",
                (DEFAULT_WORKSPACE, name),
            ):
                tags.setdefault(int(version), {})[key] = value
    except sqlite3.Error as err:
        raise TrackingUnavailable(f"MLflow tracking store {uri} is unreachable: {err}") from err
    finally:
        db.close()
    return [
        VersionRow(
            name=name,
            version=str(version),
            creation_timestamp=int(created or 0),
            current_stage=stage,
            run_id=run_id,
            tags=tags.get(int(version), {}),
        )
        for version, created, stage, run_id in sorted(rows, key=lambda row: -int(row[0]))
    ]
