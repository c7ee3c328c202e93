"""Stage ``base``: train the base detector on the anchor dataset and register it.

``python -m detloop.base [key=value ...]`` (``-m`` for sweeps); ``dvc repro base`` runs it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
from omegaconf import DictConfig, OmegaConf

from detloop import registry, tracking
from detloop.config import config_hash, resolve_path
from detloop.manifest import manifest_hash
from detloop.pyfunc import log_detector
from detloop.stage import anchor_yaml, count_images, hydra_entry, stage_dir, write_json
from detloop.yolo import load_model

log = logging.getLogger(__name__)

STAGE = "base"


def train_from_scratch(
    cfg: DictConfig, group: DictConfig, stage: str, data_yaml: Path, params: dict, run_name: str
) -> dict:
    """Train ``group.model`` with ``group.train`` on ``data_yaml`` in one MLflow run and register it.

    Shared by the ``base`` stage (anchor only) and the ``retrain`` stage (anchor + pool).
    Returns ``{version, run_id, final}``; aliases and version tags are the caller's.
    """
    model = load_model(group.model)  # refuses a .pt that would need a download
    experiment_id = tracking.setup(cfg)  # an unreachable store fails here, before any work
    out = stage_dir(cfg, stage)
    train_args = OmegaConf.to_container(group.train, resolve=True)
    with tracking.stage_run(cfg, stage, experiment_id, run_name=run_name) as run:
        run_id = run.info.run_id
        mlflow.log_params(tracking.flat_params(cfg, [stage]))
        mlflow.log_params(params)
        tracking.EpochLogger().attach(model)
        model.train(data=str(data_yaml), project=str(out / "runs"), name=run_id, exist_ok=True, **train_args)
        trainer = model.trainer
        final = tracking.finite_metrics(trainer.metrics or {}, prefix="final/")
        mlflow.log_metrics(final)
        tracking.log_training_files(Path(trainer.save_dir))
        info = log_detector(
            trainer.best,
            model_config={**OmegaConf.to_container(group.predict, resolve=True), "imgsz": train_args["imgsz"]},
            registered_model_name=cfg.mlflow.registered_model,
        )
    return {"version": str(info.registered_model_version), "run_id": run_id, "final": final}


def write_result(cfg: DictConfig, stage: str, trained: dict, lineage: dict) -> dict:
    """``build/<stage>/{model,metrics,lineage}.json``; returns the registry coordinates and metrics."""
    out = stage_dir(cfg, stage)
    name, version = cfg.mlflow.registered_model, trained["version"]
    result = {"name": name, "version": version, "run_id": trained["run_id"], "model_uri": f"models:/{name}/{version}"}
    write_json(out / "model.json", result)
    write_json(out / "metrics.json", trained["final"])
    write_json(out / "lineage.json", lineage)
    log.info("registered %s version %s (run %s)", name, version, trained["run_id"])
    objective = trained["final"].get(tracking.metric_name("final/metrics/mAP50(B)"))
    return {**result, "metrics": trained["final"], "objective": objective}


def run(cfg: DictConfig) -> dict:
    """Train, log and register a base model; returns its registry coordinates and final metrics."""
    anchor = resolve_path(cfg, "anchor")
    data_yaml = anchor_yaml(cfg, stage_dir(cfg, STAGE))
    counts = {f"data.anchor_{s}": count_images(anchor / "images" / s) for s in ("train", "val", "test")}
    params = {**counts, "data.anchor_manifest_sha256": manifest_hash(anchor / "manifest.jsonl")}
    trained = train_from_scratch(cfg, cfg.base, STAGE, data_yaml, params, run_name="base")
    _tag_and_alias(cfg, trained["version"], trained["run_id"], anchor)
    return write_result(cfg, STAGE, trained, lineage_key(cfg, anchor))


def lineage_key(cfg: DictConfig, anchor: Path) -> dict:
    """What this stage's result depends on, and nothing else: the DVC output of the stage.

    Deterministic for the same config and anchor data, so dvc.lock is the same on every machine.
    """
    return {
        "stage": STAGE,
        "config_hash": config_hash(cfg.base),
        "anchor_manifest_sha256": manifest_hash(anchor / "manifest.jsonl"),
    }


def _tag_and_alias(cfg: DictConfig, version: str, run_id: str, anchor: Path) -> None:
    """Version tags (kind, lineage) and aliases: ``base``; ``production`` too if nobody holds it."""
    name = cfg.mlflow.registered_model
    tags = {k: v for k, v in tracking.lineage_tags(cfg, STAGE).items() if k != "stage"}
    tags.update(
        {
            "kind": "base",
            "run_id": run_id,
            "pool.size": 0,
            "lineage.anchor_manifest_sha256": manifest_hash(anchor / "manifest.jsonl"),
            "lineage.base_model": str(cfg.base.model),
        }
    )
    registry.set_version_tags(name, version, tags)
    train = cfg.base.train
    registry.describe(
        cfg, version,
        f"base model: {cfg.base.model} trained {train.epochs} epochs at {train.imgsz} px on the anchor "
        f"(run {run_id}, config {tags['lineage.config_hash']}).",
    )  # fmt: skip
    in_sweep = tracking.SWEEP_TAG in mlflow.get_run(run_id).data.tags
    if not in_sweep or registry.alias_holder(name, "base") is None:
        registry.move_alias(cfg, "base", version, why="base stage trained a new base model", decision="base")
    if registry.alias_holder(name, "production") is None:
        registry.set_version_tags(name, version, {"decision": "bootstrap"})
        registry.move_alias(
            cfg, "production", version,
            why="bootstrap: first registered model, no production version yet",
            decision="bootstrap",
        )  # fmt: skip


main = hydra_entry(run)

if __name__ == "__main__":
    main()
