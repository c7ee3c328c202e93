"""A new base from scratch on anchor + pool (the ``retrain`` stage's work when a retrain is due).

Trains the base recipe (``conf/retrain``) on anchor train + every pool train sample, validates on anchor
val + pool val (pool holdout and the anchor test split are never used), and registers the result as a
candidate (``kind=base``, ``retrain=true``) that moves no alias.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from detloop.core.config import config_hash, resolve_path
from detloop.data import pool
from detloop.data.datasets import anchor_images, anchor_names, write_data_yaml
from detloop.data.manifest import MANIFEST, manifest_hash
from detloop.evaluation import gating
from detloop.tracking import registry, runs
from detloop.training.trainer import train_from_scratch, write_result

STAGE = "retrain"


def retrain_yaml(cfg: DictConfig, out: Path) -> tuple[Path, dict]:
    """An Ultralytics data yaml over anchor + pool (absolute image lists), and the counts it holds."""
    anchor = resolve_path(cfg, "anchor")
    pool.check_reviewed(cfg)  # never train on unreviewed samples
    anchor_train = anchor_images(anchor, "train")
    lists = {
        "train": anchor_train + pool.pool_samples(cfg, "train"),
        "val": anchor_images(anchor, "val") + pool.pool_samples(cfg, "val"),
    }
    data_yaml = write_data_yaml(out, anchor_names(anchor), lists)
    counts = {
        "data.anchor_train": len(anchor_train),
        "data.pool_train": len(lists["train"]) - len(anchor_train),
        "data.train": len(lists["train"]),
        "data.val": len(lists["val"]),
    }
    return data_yaml, counts


def retrain_base(cfg: DictConfig, due: dict, out: Path) -> dict:
    """Train, register and tag the new base; ``due`` is the mix stage's ``retrain.json``."""
    anchor = resolve_path(cfg, "anchor")
    pool_sha = manifest_hash(resolve_path(cfg, "pool") / MANIFEST)
    data_yaml, counts = retrain_yaml(cfg, out)
    params = {
        **counts,
        "data.anchor_manifest_sha256": manifest_hash(anchor / MANIFEST),
        "data.pool_manifest_sha256": pool_sha,
        "data.pool_size": due["pool_size"],
    }
    trained = train_from_scratch(cfg, cfg.retrain, STAGE, data_yaml, params, run_name="base retrain")
    _tag(cfg, trained, due, counts, anchor, pool_sha)
    lineage = {
        "stage": STAGE,
        "config_hash": config_hash(cfg.retrain),
        "input": due,
        "anchor_manifest_sha256": manifest_hash(anchor / MANIFEST),
    }
    result = write_result(cfg, STAGE, trained, lineage)
    # the gate's passes of the new base against the `base` holder, made where the model is loaded already
    gating.predict_ahead(cfg, trained["version"], out, alias="base")
    return result


def _tag(cfg: DictConfig, trained: dict, due: dict, counts: dict, anchor: Path, pool_sha: str) -> None:
    name, version, run_id = cfg.mlflow.registered_model, trained["version"], trained["run_id"]
    tags = {"kind": "base"}  # first: the MLflow UI lists a version's tags in the order they were set
    tags.update({k: v for k, v in runs.lineage_tags(cfg, STAGE).items() if k != "stage"})
    tags.update(
        {
            "kind": "base",
            "retrain": "true",
            "run_id": run_id,
            "pool.size": due["pool_size"],
            "pool.manifest_sha256": pool_sha,
            "lineage.anchor_manifest_sha256": manifest_hash(anchor / MANIFEST),
            "lineage.base_model": str(cfg.retrain.model),
            **({"forced": "true"} if due["forced"] else {}),
        }
    )
    registry.client().set_tag(run_id, "retrain.since_base_version", due.get("since_base_version") or "")
    registry.set_version_tags(name, version, tags)
    registry.describe(
        cfg,
        version,
        f"base retrain from scratch: {cfg.retrain.model}, {cfg.retrain.train.epochs} epochs on "
        f"{counts['data.anchor_train']} anchor + {counts['data.pool_train']} pool train samples (pool of "
        f"{due['pool_size']}){' (forced)' if due['forced'] else ''}; run {run_id}. A candidate for the `base` "
        "alias: awaiting the gates.",
    )
