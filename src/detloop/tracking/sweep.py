"""One MLflow parent run per Hydra sweep, created once by the launching process.

Jobs of a sweep may run at the same time in separate processes (``hydra/launcher=submitit_local``,
``submitit_slurm``) against one tracking server, so "search for the sweep's parent run, else create
it" in every job would race into several parents. Instead the Hydra callback
:class:`detloop.tracking.callbacks.SweepParent` (``hydra.callbacks`` in ``conf/config.yaml``) creates
the parent in ``on_multirun_start``, before any job starts, and writes its id to
``<sweep dir>/mlflow_parent_run.json``; every job reads that file (jobs of submitit and SLURM share the
sweep folder). When the file is missing (a config without the callback), the first job to take
``<file>.lock`` (an exclusive create) makes the parent and writes the file; the others wait for it.
MLflow is imported where it is used: the callback loads this module in every stage's process.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

SWEEP_TAG = "detloop.sweep_dir"
SWEEP_JOB_TAG = "detloop.sweep_job"  # the job's number in the sweep (hydra.job.num)
PARENT_FILE = "mlflow_parent_run.json"
WAIT_SECONDS = 120.0  # how long a job waits for the job that took the lock to write the parent file


def sweep_folder(hydra_cfg) -> str:
    """The sweep folder as an absolute path (a relative ``hydra.sweep.dir`` is relative to the launch folder)."""
    folder = Path(str(hydra_cfg.sweep.dir))
    if not folder.is_absolute():
        folder = Path(str(hydra_cfg.runtime.cwd)) / folder
    return str(folder.resolve())


def stage_name(hydra_cfg) -> str:
    """The stage being swept: ``base`` for ``python -m detloop.base -m ...`` (else Hydra's job name)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    module = getattr(spec, "name", "") or ""
    if module.startswith("detloop.") and module.count(".") == 1:
        return module.split(".", 1)[1]
    return str(hydra_cfg.job.name)


def create_parent(experiment_id: str, folder: str, stage: str, overrides: list[str] | None = None) -> str:
    """Create (and close) the parent run that groups a sweep's jobs in the MLflow UI; returns its id."""
    import mlflow

    from detloop.core import failures

    tags = {SWEEP_TAG: folder, "stage": stage, "detloop.sweep": "parent"}
    if overrides:
        tags["detloop.sweep.overrides"] = " ".join(overrides)[:4000]
    client = mlflow.MlflowClient()
    with failures.acting(f"creating the parent run of the {stage} sweep", needs="EDIT on the stage's experiment"):
        run = client.create_run(experiment_id, run_name=f"{stage}-sweep-{Path(folder).name}", tags=tags)
        client.set_terminated(run.info.run_id)
    return run.info.run_id


def _write(path: Path, record: dict) -> None:
    """Write ``record`` so readers never see half a file (a temporary file renamed into place)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def write_parent(folder: str, run_id: str, experiment_id: str) -> Path:
    """``<folder>/mlflow_parent_run.json``: the parent's run id, experiment and tracking URI (jobs check both)."""
    import mlflow

    path = Path(folder) / PARENT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, {"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": mlflow.get_tracking_uri()})
    return path


def _created_once(path: Path, experiment_id: str, folder: str, stage: str) -> dict | None:
    """The fallback without the callback: one job creates the parent (exclusive lock file), the others wait."""
    lock = path.with_name(path.name + ".lock")
    try:
        handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            record = _read(path)
            if record is not None:
                return record
            time.sleep(0.2)
        log.warning(
            "no %s in %s after %.0f s (the job that took %s died?): this run has no parent",
            path.name,
            folder,
            WAIT_SECONDS,
            lock.name,
        )
        return None
    try:
        record = _read(path)  # written by a job that held the lock before us
        if record is None:
            run_id = create_parent(experiment_id, folder, stage)
            write_parent(folder, run_id, experiment_id)
            record = _read(path)
    finally:
        os.close(handle)
        lock.unlink(missing_ok=True)
    return record


def parent_run(experiment_id: str, folder: str, stage: str) -> str | None:
    """The id of the sweep's parent run for a job of the sweep in ``folder`` (None: run without a parent)."""
    path = Path(folder) / PARENT_FILE
    record = _read(path)
    if record is None:
        log.info("%s has no %s (hydra.callbacks without SweepParent?): the first job creates it", folder, PARENT_FILE)
        record = _created_once(path, experiment_id, folder, stage)
    if record is None:
        return None
    import mlflow

    here = (str(experiment_id), mlflow.get_tracking_uri())
    there = (str(record.get("experiment_id")), record.get("tracking_uri"))
    if here != there:
        log.warning(
            "the sweep's parent run %s is in experiment %s at %s, this job logs to experiment %s at %s: no parent",
            record.get("run_id"),
            *there,
            *here,
        )
        return None
    return str(record["run_id"])
