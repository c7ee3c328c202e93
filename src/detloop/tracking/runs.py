"""MLflow wiring shared by every stage: one store, one run per stage job, lineage and device tags."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import yaml
from omegaconf import DictConfig, OmegaConf

from detloop.core.config import config_hash
from detloop.core.env import in_project, project_root
from detloop.core.errors import TrackingUnavailable

log = logging.getLogger(__name__)

SWEEP_TAG = "detloop.sweep_dir"


def _store_dir(cfg: DictConfig, root: Path | None = None) -> Path:
    return in_project(cfg.mlflow.store_dir, root)


def tracking_uri(cfg: DictConfig, root: Path | None = None) -> str:
    """The configured tracking URI; by default the project's SQLite store under ``mlflow.store_dir``."""
    uri = cfg.mlflow.tracking_uri
    if uri:
        return str(uri)
    return f"sqlite:///{_store_dir(cfg, root) / 'mlflow.db'}"


def default_artifact_root(cfg: DictConfig, root: Path | None = None) -> str | None:
    """Artifact folder for experiments in the project's own store (None elsewhere: the server decides).

    ``mlflow.set_tracking_uri`` exports ``MLFLOW_TRACKING_URI``, which ``mlflow.tracking_uri`` reads,
    so after setup the key names the project's own store explicitly: that still counts as our store.
    """
    own = f"sqlite:///{_store_dir(cfg, root) / 'mlflow.db'}"
    if cfg.mlflow.tracking_uri and str(cfg.mlflow.tracking_uri) != own:
        return None
    return (_store_dir(cfg, root) / "artifacts").as_uri()


def setup(cfg: DictConfig, experiment: str | None = None) -> str:
    """Point MLflow at the configured store, check it answers, and select the experiment.

    Raises TrackingUnavailable (naming the URI) before any work starts if the store is unreachable.
    Returns the experiment id.
    """
    uri = tracking_uri(cfg)
    scheme = urlparse(uri).scheme
    lock = contextlib.nullcontext()
    if scheme == "sqlite":
        db = Path(uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        # concurrent first use (parallel sweep jobs, two stages) would race on MLflow's schema
        # migration and on creating the experiment: one process at a time does the get-or-create
        lock = _file_lock(db.with_name(db.name + ".setup.lock"))
    elif scheme in ("http", "https"):
        _check_server(uri)
    mlflow.set_tracking_uri(uri)
    name = experiment or cfg.mlflow.experiment
    try:
        with lock:
            client = mlflow.MlflowClient()
            found = client.get_experiment_by_name(name)
            if found is None:
                experiment_id = client.create_experiment(name, artifact_location=default_artifact_root(cfg))
            else:
                experiment_id = found.experiment_id
    except Exception as err:  # connection errors surface as several MLflow/requests types
        raise TrackingUnavailable(f"MLflow tracking store {uri} is unreachable: {err}") from err
    if not os.environ.get("MLFLOW_RUN_ID"):  # `mlflow run` chose the experiment already
        mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock on ``path`` for the duration of the block (POSIX flock)."""
    import fcntl

    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_server(uri: str, timeout: float = 10.0) -> None:
    """A tracking server must answer /health before any work starts (MLflow itself retries for minutes)."""
    import requests

    try:
        response = requests.get(uri.rstrip("/") + "/health", timeout=timeout)
        response.raise_for_status()
    except requests.RequestException as err:
        raise TrackingUnavailable(f"MLflow tracking server {uri} is unreachable: {err}") from err


def git_commit(root: Path | None = None) -> str:
    """HEAD commit, with ``-dirty`` when tracked files differ from it ('' outside git)."""
    root = root or project_root()
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=root, check=False).returncode
    except (OSError, subprocess.CalledProcessError):
        return ""
    return f"{head}-dirty" if dirty else head


def data_dvc_md5(root: Path | None = None) -> str:
    """The md5 that ``data.dvc`` records for ``data/`` ('' if there is none)."""
    path = (root or project_root()) / "data.dvc"
    if not path.is_file():
        return ""
    outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or [{}]
    return str(outs[0].get("md5", ""))


def lineage_tags(cfg: DictConfig, stage: str) -> dict[str, str]:
    """Tags that let a run (and its registered version) be rebuilt."""
    node = cfg.get(stage, cfg)
    return {
        "stage": stage,
        "lineage.git_commit": git_commit(),
        "lineage.data_dvc_md5": data_dvc_md5(),
        "lineage.config_hash": config_hash(node),
    }


def flat_params(cfg: DictConfig, keys: list[str]) -> dict[str, str]:
    """``{'base.train.epochs': '30', ...}`` for the given top-level config groups."""
    out: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        else:
            out[prefix] = str(value)

    for key in keys:
        walk(key, OmegaConf.to_container(cfg[key], resolve=True))
    return out


def sweep_dir() -> str | None:
    """The sweep folder when running as one job of a Hydra multirun, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return None
    if hc.mode != RunMode.MULTIRUN:
        return None
    return str(Path(hc.sweep.dir).resolve())


def _sweep_parent(experiment_id: str, sweep_dir: str, stage: str) -> str:
    """The parent run that groups a sweep's jobs in the MLflow UI (created by the first job)."""
    client = mlflow.MlflowClient()
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_dir}' and tags.`detloop.sweep` = 'parent'",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(
        experiment_id,
        run_name=f"{stage}-sweep-{Path(sweep_dir).name}",
        tags={SWEEP_TAG: sweep_dir, "stage": stage, "detloop.sweep": "parent"},
    )
    client.set_terminated(run.info.run_id)
    return run.info.run_id


@contextlib.contextmanager
def stage_run(cfg: DictConfig, stage: str, experiment_id: str, run_name: str | None = None) -> Iterator:
    """One MLflow run for one stage job, tagged with stage, lineage and device.

    Inside ``mlflow run`` it continues the run MLflow created; inside a Hydra sweep it is a child of
    the sweep's parent run.
    """
    from detloop.model.yolo import device_info

    tags = lineage_tags(cfg, stage)
    parent = None
    sweep = sweep_dir()
    if sweep and not os.environ.get("MLFLOW_RUN_ID"):
        parent = _sweep_parent(experiment_id, sweep, stage)
        tags[SWEEP_TAG] = sweep
    with mlflow.start_run(run_name=run_name, parent_run_id=parent, tags=tags) as run:
        mlflow.set_tags(device_info())
        yield run


_METRIC_NAME = re.compile(r"[^0-9A-Za-z_\-. /]")


def metric_name(key: str) -> str:
    """Ultralytics keys like ``metrics/mAP50(B)`` as legal MLflow metric names (``metrics/mAP50B``)."""
    return _METRIC_NAME.sub("", key)


def finite_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[metric_name(prefix + key)] = number
    return out


TRAINING_FILE_SUFFIXES = (".png", ".jpg", ".csv", ".yaml")


def log_training_files(save_dir: Path) -> None:
    """Ultralytics' plots, results.csv and args.yaml of a training run as artifacts under ``training/``."""
    for path in sorted(save_dir.glob("*")):
        if path.is_file() and path.suffix in TRAINING_FILE_SUFFIXES:
            mlflow.log_artifact(str(path), artifact_path="training")


class EpochLogger:
    """Ultralytics callbacks that log each epoch's losses, val metrics and learning rates."""

    def attach(self, model) -> None:
        model.add_callback("on_fit_epoch_end", self.on_fit_epoch_end)

    def on_fit_epoch_end(self, trainer) -> None:
        if trainer.epoch >= trainer.epochs:  # the final validation of best.pt, logged as final/ metrics
            return
        values = {}
        values.update(trainer.label_loss_items(trainer.tloss, prefix="train"))
        values.update(trainer.metrics or {})
        values.update(trainer.lr or {})
        mlflow.log_metrics(finite_metrics(values), step=trainer.epoch + 1)
