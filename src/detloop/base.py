"""Stage ``base``: train the base detector on the anchor dataset and register it.

``python -m detloop.base [key=value ...]`` (``-m`` for sweeps); ``dvc repro base`` runs it. Once the version
is registered, its pass on the anchor split ``evaluate`` measures is made here, where torch and Ultralytics
are already loaded, and kept for ``evaluate`` and the gate (:func:`detloop.evaluation.measure.predict_split`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
from omegaconf import DictConfig

from detloop.core.config import config_hash, resolve_path
from detloop.core.errors import MoveConflict
from detloop.core.stage import hydra_entry, stage_dir
from detloop.data.datasets import anchor_yaml, count_images
from detloop.data.manifest import MANIFEST, manifest_hash
from detloop.tracking import registry, runs
from detloop.training.trainer import train_from_scratch, write_result

log = logging.getLogger(__name__)

STAGE = "base"


def run(cfg: DictConfig) -> dict:
    """Train, log and register a base model; returns its registry coordinates and final metrics."""
    anchor = resolve_path(cfg, "anchor")
    data_yaml = anchor_yaml(cfg, stage_dir(cfg, STAGE))
    counts = {f"data.anchor_{s}": count_images(anchor / "images" / s) for s in ("train", "val", "test")}
    params = {**counts, "data.anchor_manifest_sha256": manifest_hash(anchor / MANIFEST)}
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
        "anchor_manifest_sha256": manifest_hash(anchor / MANIFEST),
    }


def _tag_and_alias(cfg: DictConfig, version: str, run_id: str, anchor: Path) -> None:
    """Version tags (kind, lineage) and aliases: ``base``; ``production`` too if nobody holds it."""
    name = cfg.mlflow.registered_model
    tags = {"kind": "base"}  # first: the MLflow UI lists a version's tags in the order they were set
    tags.update({k: v for k, v in runs.lineage_tags(cfg, STAGE).items() if k != "stage"})
    tags.update(
        {
            "kind": "base",
            "run_id": run_id,
            "pool.size": 0,
            "lineage.anchor_manifest_sha256": manifest_hash(anchor / MANIFEST),
            "lineage.base_model": str(cfg.base.model),
        }
    )
    registry.set_version_tags(name, version, tags)
    train = cfg.base.train
    registry.describe(
        cfg,
        version,
        f"base model: {cfg.base.model} trained {train.epochs} epochs at {train.imgsz} px on the anchor "
        f"(run {run_id}, config {tags['lineage.config_hash']}).",
    )
    in_sweep = runs.SWEEP_TAG in mlflow.get_run(run_id).data.tags
    why = "base stage trained a new base model"
    if not in_sweep:
        registry.move_alias(cfg, "base", version, why=why, decision="base")
        took_base = True
    else:  # a sweep: the first job to finish takes base; a job that finds it taken takes nothing
        took_base = registry.alias_holder(name, "base") is None and _take_if_free(
            cfg, "base", version, why=why, decision="base"
        )
    # a sweep into an empty registry: the job that took base bootstraps production too (one first model),
    # never a job that found base taken while its taker had not yet reached production
    if took_base and registry.alias_holder(name, "production") is None:
        _take_if_free(
            cfg,
            "production",
            version,
            why="bootstrap: first registered model, no production version yet",
            decision="bootstrap",
            version_tags={"decision": "bootstrap"},
        )


def _take_if_free(cfg: DictConfig, alias: str, version: str, **move) -> bool:
    """Give ``alias`` to ``version`` only while nobody holds it: of parallel jobs (a sweep) exactly one takes it.

    Returns whether this one did.
    """
    try:
        registry.move_alias(cfg, alias, version, expected=None, **move)
    except MoveConflict as err:
        log.info("v%s does not take %s: another job took it first (%s)", version, alias, err)
        return False
    return True


main = hydra_entry(run)

if __name__ == "__main__":
    main()
