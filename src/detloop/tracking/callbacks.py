"""Hydra callbacks of detloop's stages (``hydra.callbacks`` in ``conf/config.yaml``), named after Hydra's events.

Hydra instantiates them for every run, also of the cheap stages (``trigger``), so MLflow is imported
only inside the event that needs it.
"""

from __future__ import annotations

import logging
import os
import sys

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from detloop.core.failures import report

log = logging.getLogger(__name__)


class SweepParent(Callback):
    """Hydra callback (``hydra.callbacks`` in ``conf/config.yaml``): the sweep's MLflow parent run, made once.

    ``on_multirun_start`` runs in the launching process before any job: it sets up MLflow as the stages
    do (:func:`detloop.tracking.runs.setup`), creates the parent run and writes its id to
    ``<sweep dir>/mlflow_parent_run.json``. An unreachable or refusing server stops the sweep there with
    the stage's message and exit code (3), before any job starts. Inside ``mlflow run`` (``MLFLOW_RUN_ID``)
    MLflow's own run is the parent, and nothing is created. ``stages``: the stages whose jobs log an MLflow
    run (others, e.g. a sweep of ``gate``, get no empty parent); None = every stage.
    """

    def __init__(self, stages: list[str] | None = None) -> None:
        self.stages = None if stages is None else {str(s) for s in stages}

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        from detloop.tracking.sweep import create_parent, stage_name, sweep_folder, write_parent

        folder, stage = sweep_folder(config.hydra), stage_name(config.hydra)
        if os.environ.get("MLFLOW_RUN_ID") or (self.stages is not None and stage not in self.stages):
            return
        from detloop.tracking import runs  # MLflow: only for a sweep that logs runs

        try:
            experiment_id = runs.setup(config)
            run_id = create_parent(experiment_id, folder, stage, list(config.hydra.overrides.task))
        except Exception as err:
            code = report(err, log.error)
            if code is None:
                raise
            sys.exit(code)
        path = write_parent(folder, run_id, experiment_id)
        log.info("sweep parent run %s (%s)", run_id, path)
