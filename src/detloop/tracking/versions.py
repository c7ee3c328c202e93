"""What the trigger and retrain checks need from the registry: the newest fine-tune and base versions.

Read-only and cheap: on the project's SQLite store the versions come straight from the database
(:func:`detloop.tracking.store.sqlite_versions`, no ``import mlflow``); elsewhere through MLflow's client.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from omegaconf import DictConfig

from detloop.tracking import store

log = logging.getLogger(__name__)


def model_versions(cfg: DictConfig, *, set_up: bool = False) -> list:
    """Every version of the registered model (none when it does not exist yet), newest first.

    Items carry ``version``, ``tags`` and ``creation_timestamp`` (MLflow ``ModelVersion`` or
    :class:`detloop.tracking.store.VersionRow`). Another store than the project's SQLite file is
    set up first (:func:`detloop.tracking.runs.setup`: unreachable or refusing servers exit 3),
    unless the caller did that already (``set_up=True``).
    """
    name = cfg.mlflow.registered_model
    rows = store.sqlite_versions(store.tracking_uri(cfg), name)
    if rows is not None:
        return rows
    import mlflow
    from mlflow.exceptions import MlflowException

    from detloop.tracking import runs

    if not set_up:
        runs.setup(cfg)
    try:
        found = list(mlflow.MlflowClient().search_model_versions(f"name='{name}'", max_results=10000))
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return []
        raise
    return sorted(found, key=lambda v: -int(v.version))


def last_finetune(cfg: DictConfig, versions: list | None = None) -> dict | None:
    """``{version, pool_size, created}`` of the newest fine-tune version of the registered model.

    Fine-tunes are the versions tagged ``kind=finetune``; their pool size is the tag ``pool.size``.
    None when the model or such versions do not exist. ``versions``: :func:`model_versions`, if read.
    """
    name = cfg.mlflow.registered_model
    versions = model_versions(cfg) if versions is None else versions
    finetunes = [v for v in versions if (v.tags or {}).get("kind") == "finetune"]
    for version in sorted(finetunes, key=lambda v: int(v.version), reverse=True):
        size = (version.tags or {}).get("pool.size")
        if size is None or not str(size).isdigit():
            log.warning("%s version %s is a fine-tune without a pool.size tag; skipped", name, version.version)
            continue
        created = datetime.fromtimestamp(version.creation_timestamp / 1000, UTC)
        return {
            "version": str(version.version),
            "pool_size": int(size),
            "created": created.isoformat(timespec="seconds"),
        }
    return None


def last_base(cfg: DictConfig, versions: list | None = None) -> dict | None:
    """``{version, pool_size}`` of the newest ``kind=base`` version (a base without ``pool.size`` saw no pool)."""
    versions = model_versions(cfg) if versions is None else versions
    bases = [v for v in versions if (v.tags or {}).get("kind") == "base"]
    if not bases:
        return None
    newest = max(bases, key=lambda v: int(v.version))
    size = str((newest.tags or {}).get("pool.size", "0"))
    return {"version": str(newest.version), "pool_size": int(size) if size.isdigit() else 0}
