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

from detloop.core import failures
from detloop.core.config import config_hash
from detloop.core.env import project_root
from detloop.core.errors import PermissionRefused, TrackingUnavailable
from detloop.core.stage import multirun_job
from detloop.tracking.store import default_artifact_root, sqlite_file, tracking_uri
from detloop.tracking.sweep import SWEEP_JOB_TAG, SWEEP_TAG, parent_run, sweep_folder

log = logging.getLogger(__name__)


def setup(cfg: DictConfig, experiment: str | None = None) -> str:
    """Point MLflow at the configured store, check it answers, and select the experiment.

    Raises TrackingUnavailable (naming the URI) before any work starts if the store is unreachable,
    PermissionRefused if the server refuses the user. Returns the experiment id.
    """
    uri = tracking_uri(cfg)
    scheme = urlparse(uri).scheme
    lock = contextlib.nullcontext()
    db = sqlite_file(uri)
    if db is not None:
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
            experiment_id = get_or_create_experiment(name, default_artifact_root(cfg))
    except (PermissionRefused, TrackingUnavailable):
        raise
    except Exception as err:  # other connection errors (e.g. an unusable SQLite file) surface as many types
        raise TrackingUnavailable(f"MLflow tracking store {uri} is unreachable: {err}") from err
    if not os.environ.get("MLFLOW_RUN_ID"):  # `mlflow run` chose the experiment already
        mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def get_or_create_experiment(name: str, artifact_location: str | None) -> str:
    """The id of experiment ``name``, created if missing; safe when other processes create it at the same time.

    A create that loses the race (``RESOURCE_ALREADY_EXISTS``) reads the winner's experiment.
    """
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    with failures.acting(f"creating or reading experiment {name}", needs="permission to create experiments"):
        found = client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        return client.get_experiment_by_name(name).experiment_id


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
        raise TrackingUnavailable(
            f"MLflow tracking server {uri} is unreachable: {failures.reason(err)} (GET /health; nothing started)"
        ) from err


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
    """The sweep folder (absolute) when running as one job of a Hydra multirun, else None."""
    hc = multirun_job()
    return None if hc is None else sweep_folder(hc)


def sweep_job() -> str:
    """The job's number in its sweep (Hydra's ``hydra.job.num``: the job folder's name, the trial's order)."""
    from hydra.core.hydra_config import HydraConfig

    return str(HydraConfig.get().job.num)


@contextlib.contextmanager
def stage_run(cfg: DictConfig, stage: str, experiment_id: str, run_name: str | None = None) -> Iterator:
    """One MLflow run for one stage job, tagged with stage, lineage and device.

    Inside ``mlflow run`` it continues the run MLflow created; inside a Hydra sweep it is a child of
    the sweep's parent run (:mod:`detloop.tracking.sweep`).
    """
    from detloop.model.yolo import device_info

    tags = {**lineage_tags(cfg, stage), **cluster_tags()}
    parent = None
    sweep = sweep_dir()
    if sweep and not os.environ.get("MLFLOW_RUN_ID"):
        parent = parent_run(experiment_id, sweep, stage)  # made once by the sweep's SweepParent callback
        tags[SWEEP_TAG] = sweep
        tags[SWEEP_JOB_TAG] = sweep_job()
    experiment = cfg.mlflow.experiment
    with failures.acting(
        f"starting the {stage} run in experiment {experiment}", needs=f"EDIT on experiment {experiment}"
    ):
        active = mlflow.start_run(run_name=run_name, parent_run_id=parent, tags=tags)
    with active as run:
        mlflow.set_tags(device_info())
        yield run


def cluster_tags() -> dict[str, str]:
    """The scheduler job a run ran in (SLURM: ``<array job>_<task>`` as squeue shows it, else the job id)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return {}
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    tags = {"cluster.slurm_job_id": f"{array}_{task}" if array and task else job}
    for key, env in (("cluster.slurm_partition", "SLURM_JOB_PARTITION"), ("cluster.node", "SLURMD_NODENAME")):
        if os.environ.get(env):
            tags[key] = os.environ[env]
    return tags


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
    """Ultralytics callbacks that log a training into its stage run: each epoch's losses, val metrics and
    learning rates, the final validation of best.pt (``final/...``), the devices and AMP it trained with
    (``device.*`` tags) and each GPU's peak memory (``device/gpu_<i>_peak_memory_gb``).

    Ultralytics DDP (``device=0,1``) pickles these callbacks into every worker process, where they run
    on every rank and outside the parent's active run. So only the main rank logs (its rank read from
    the worker's environment at call time), and always into ``run_id`` by id with a client on the
    tracking URI captured here: the fluent API in a worker would start a stray run.
    """

    def __init__(self, run_id: str, tracking_uri: str | None = None) -> None:
        self.run_id = run_id
        self.tracking_uri = tracking_uri or mlflow.get_tracking_uri()
        self._peaks: dict[int, float] = {}
        self._stopped = False  # the last epoch told the trainer to stop: the next call is the final validation

    def attach(self, model) -> None:
        model.add_callback("on_train_start", self.on_train_start)
        model.add_callback("on_fit_epoch_end", self.on_fit_epoch_end)
        model.add_callback("on_train_end", self.on_train_end)

    def on_train_start(self, trainer) -> None:
        from detloop.model.yolo import reset_peak_memory, training_device_info

        reset_peak_memory(trainer)
        if is_main_rank():  # trainer.amp is Ultralytics' own decision by now (its AMP check ran in setup)
            _log_by_id(self.tracking_uri, self.run_id, tags=training_device_info(trainer))

    def on_fit_epoch_end(self, trainer) -> None:
        from detloop.model.yolo import merge_ranks, peak_memory_gb

        self._peaks = merge_ranks(peak_memory_gb(trainer))  # a DDP collective: every rank, every call
        if not is_main_rank():
            return
        if self._stopped or trainer.epoch >= trainer.epochs:  # the final validation of best.pt
            _log_by_id(self.tracking_uri, self.run_id, metrics=finite_metrics(trainer.metrics or {}, "final/"))
            return
        values = {}
        values.update(trainer.label_loss_items(trainer.tloss, prefix="train"))
        values.update(trainer.metrics or {})
        values.update(trainer.lr or {})
        _log_by_id(self.tracking_uri, self.run_id, metrics=finite_metrics(values), step=trainer.epoch + 1)
        self._stopped = bool(getattr(trainer, "stop", False))  # early stopping ends before `epochs`

    def on_train_end(self, trainer) -> None:
        from detloop.model.yolo import peak_memory_gb

        if not is_main_rank():  # Ultralytics calls this on the main rank only; kept safe anyway
            return
        peaks = dict(self._peaks)  # every rank's, as of the last epoch
        for index, value in peak_memory_gb(trainer).items():  # this rank's, final validation included
            peaks[index] = max(value, peaks.get(index, value))
        metrics = {f"device/gpu_{index}_peak_memory_gb": value for index, value in sorted(peaks.items())}
        if metrics:
            _log_by_id(self.tracking_uri, self.run_id, metrics=metrics)


def training_rank() -> int:
    """This process's rank in an Ultralytics DDP training, read now as Ultralytics reads it (-1: no DDP).

    ``ultralytics.utils.RANK`` is ``RANK`` when ``WORLD_SIZE`` > 1 (both set by ``torch.distributed.run``).
    Read at call time: a callback pickled in the launching process runs in each worker.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return -1
    return int(os.environ.get("RANK", "-1"))


def is_main_rank() -> bool:
    """True where Ultralytics does its main-process work (no DDP, or DDP rank 0): the only place to log."""
    return training_rank() in {-1, 0}


def _log_by_id(
    tracking_uri: str, run_id: str, *, metrics: dict[str, float] | None = None, step: int = 0, tags: dict | None = None
) -> None:
    """Metrics and tags into ``run_id`` in one request, without the fluent API's active run."""
    import time

    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    mlflow.MlflowClient(tracking_uri=tracking_uri).log_batch(
        run_id,
        metrics=[Metric(key, value, now, step) for key, value in (metrics or {}).items()],
        tags=[RunTag(key, str(value)) for key, value in (tags or {}).items()],
    )
