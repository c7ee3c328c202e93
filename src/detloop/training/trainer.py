"""Train a YOLO model inside one stage run, log it and register it as a new version.

Shared by the stages that train: ``base`` and ``retrain`` (from scratch) and ``finetune`` (from the base)."""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
from omegaconf import DictConfig, OmegaConf

from detloop.core.errors import BadInput
from detloop.core.stage import stage_dir, write_json
from detloop.data import remote
from detloop.evaluation import measure
from detloop.model.pyfunc import log_detector
from detloop.model.yolo import load_model
from detloop.tracking import oversight, records, registry, runs

log = logging.getLogger(__name__)


def train_and_register(
    cfg: DictConfig,
    model,
    group: DictConfig,
    stage: str,
    data_yaml: Path,
    *,
    experiment_id: str,
    run_name: str,
    params: dict,
    param_groups: list[str],
    tags: dict | None = None,
    artifacts: dict[str, Path] | None = None,
) -> dict:
    """Train ``model`` with ``group.train`` on ``data_yaml`` in one MLflow run of ``stage``, log the
    per-epoch metrics, plots and files, and register the best checkpoint with ``group.predict``'s
    serving thresholds. Returns ``{version, run_id, final}``; aliases and version tags are the caller's.
    ``experiment_id`` is :func:`detloop.tracking.runs.setup`'s, called by the stage before any work.
    """
    out = stage_dir(cfg, stage)
    train_args = OmegaConf.to_container(group.train, resolve=True)
    remote.push_for_training(cfg, stage)  # the version's lineage.data_dvc_md5 must resolve on other machines
    with runs.stage_run(cfg, stage, experiment_id, run_name=run_name) as run:
        run_id = run.info.run_id
        if tags:
            mlflow.set_tags(tags)
        mlflow.log_params(runs.flat_params(cfg, param_groups))
        # the version's kind as an immutable record (a version tag can be edited in the MLflow UI)
        mlflow.log_params({**params, records.KIND_PARAM: "finetune" if stage == "finetune" else "base"})
        for artifact_path, folder in (artifacts or {}).items():
            mlflow.log_artifacts(str(folder), artifact_path=artifact_path)
        # by run id from the main rank only: DDP workers run the callbacks too, outside this active run
        runs.EpochLogger(run_id).attach(model)
        model.train(data=str(data_yaml), project=str(out / "runs"), name=run_id, exist_ok=True, **train_args)
        trainer = model.trainer
        final = _final_metrics(run_id, trainer)
        runs.log_training_files(Path(trainer.save_dir))
        info = log_detector(
            trainer.best,
            model_config={**OmegaConf.to_container(group.predict, resolve=True), "imgsz": train_args["imgsz"]},
            registered_model_name=cfg.mlflow.registered_model,
            onnx=bool(cfg.mlflow.export.onnx),
        )
    return {
        "version": str(info.registered_model_version),
        "run_id": run_id,
        "final": final,
        "weights": Path(trainer.best) if Path(trainer.best).is_file() else None,
        "imgsz": int(train_args["imgsz"]),
    }


def _final_metrics(run_id: str, trainer) -> dict[str, float]:
    """The run's ``final/`` metrics: the validation of best.pt as the training process logged it (in DDP
    a worker; the launching trainer holds no metrics then), else the last epoch's validation (no best.pt).
    """
    logged = mlflow.MlflowClient().get_run(run_id).data.metrics
    final = {key: value for key, value in logged.items() if key.startswith("final/")}
    if not final:
        final = runs.finite_metrics(trainer.metrics or {}, prefix="final/")
        mlflow.log_metrics(final)
    return final


def train_from_scratch(
    cfg: DictConfig, group: DictConfig, stage: str, data_yaml: Path, params: dict, run_name: str
) -> dict:
    """Train ``group.model`` from its architecture (or a local ``.pt``) on ``data_yaml`` and register it.

    Used by the ``base`` stage (anchor only) and the ``retrain`` stage (anchor + pool).
    """
    model = load_model(group.model)  # refuses a .pt that would need a download
    experiment_id = runs.setup(cfg)  # an unreachable store fails here, before any work
    trained = train_and_register(
        cfg,
        model,
        group,
        stage,
        data_yaml,
        experiment_id=experiment_id,
        run_name=run_name,
        params=params,
        param_groups=[stage],
    )
    if trained["weights"] is not None:
        # the new base's pass on the split `evaluate` measures, made here where torch and Ultralytics are
        # already loaded; `evaluate` and the gate find it in the prediction cache
        measure.predict_split(cfg, trained["weights"], trained["imgsz"])
    return trained


def write_result(cfg: DictConfig, stage: str, trained: dict, lineage: dict) -> dict:
    """``build/<stage>/{model,metrics,lineage}.json``; returns the registry coordinates and metrics."""
    out = stage_dir(cfg, stage)
    name, version = cfg.mlflow.registered_model, trained["version"]
    result = {"name": name, "version": version, "run_id": trained["run_id"], "model_uri": f"models:/{name}/{version}"}
    write_json(out / "model.json", result)
    write_json(out / "metrics.json", trained["final"])
    write_json(out / "lineage.json", lineage)
    log.info("registered %s version %s (run %s)", name, version, trained["run_id"])
    objective = trained["final"].get(runs.metric_name("final/metrics/mAP50(B)"))
    return {**result, "metrics": trained["final"], "objective": objective}


def starting_version(cfg: DictConfig) -> str:
    """The version to fine-tune from: pinned or the ``base`` alias; never a fine-tuned version."""
    name = cfg.mlflow.registered_model
    pinned = cfg.finetune.base_version
    version = str(pinned) if pinned is not None else registry.alias_holder(name, "base")
    if version is None:
        raise BadInput(f"no version of {name} holds the alias 'base'", ["run the base stage first (dvc repro base)"])
    oversight.watch(cfg)  # a `base` moved in the MLflow UI is recorded (and put back if it breaks the rule)
    if pinned is None:
        version = registry.alias_holder(name, "base") or version
    proof = records.evidence(cfg, version)
    if proof.kind != "base":
        raise BadInput(
            f"refusing to fine-tune from version {version} (kind={proof.kind}, from its training run's params): "
            "never chain fine-tunes",
            [
                f"finetune.base_version={pinned}: fine-tunes always start from a base model; "
                "leave it null to use the 'base' alias"
            ],
        )
    if proof.tampered:
        raise BadInput(
            f"refusing to fine-tune from version {version}: its tags were edited outside detloop: {proof.explain()}",
            [f"put the tags back as the records say: detloop registry --repair {version}"],
        )
    return version
