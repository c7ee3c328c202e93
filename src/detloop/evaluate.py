"""Stage ``evaluate``: the registered base model on the anchor test split.

Measured exactly as the gates measure (:func:`detloop.evaluation.measure.measure`, ``conf/evaluate``),
so the base's anchor-test mAP50 here is the figure its gate reports. Writes mAP50, mAP50-95, the
detection rate at the serving confidence and per-class AP as DVC metrics
(``build/evaluate/metrics.json``) and logs them to MLflow: an ``evaluate`` run of its own, the
model's training run (so the compare view shows them next to training curves) and version tags.

The prediction pass is the one the base stage made right after registering the version (kept in
``build/cache/predictions`` for the same weights, images and settings), so on a ``dvc repro`` this stage
loads neither torch nor Ultralytics; without that pass (cache off or emptied) it predicts itself.
"""

from __future__ import annotations

import logging
import time

import mlflow
from mlflow.entities import Metric
from omegaconf import DictConfig

from detloop.core.config import config_hash
from detloop.core.stage import hydra_entry, read_json, stage_dir, write_json
from detloop.data.manifest import sha256_file
from detloop.evaluation.measure import evaluate_model, figure_tags
from detloop.tracking import registry, runs

log = logging.getLogger(__name__)

STAGE = "evaluate"


def lineage_key(cfg: DictConfig) -> dict:
    """The DVC output: what this evaluation depends on (identical on every machine for the same inputs)."""
    base_key = stage_dir(cfg, "base") / "lineage.json"
    return {
        "stage": STAGE,
        "config_hash": config_hash(cfg.evaluate),
        "base_lineage_sha256": sha256_file(base_key) if base_key.is_file() else "",
    }


def run(cfg: DictConfig) -> dict:
    """Evaluate the version the base stage registered (``build/base/model.json``)."""
    target = read_json(stage_dir(cfg, "base") / "model.json", "registered base model")
    experiment_id = runs.setup(cfg)
    metrics = evaluate_model(cfg, target["model_uri"])
    flat = {f"anchor_{metrics['split']}/{k}": metrics[k] for k in ("map50", "map50_95", "detection_rate")}
    for cls, values in metrics["per_class"].items():
        flat.update({f"anchor_{metrics['split']}/{cls}/{k}": v for k, v in values.items()})
    with runs.stage_run(cfg, STAGE, experiment_id, run_name=f"evaluate v{target['version']}"):
        mlflow.set_tags({"model_version": target["version"], "model_uri": target["model_uri"]})
        mlflow.log_params(runs.flat_params(cfg, ["evaluate"]))
        mlflow.log_metrics(runs.finite_metrics(flat))
        mlflow.log_dict(metrics, "evaluate/metrics.json")
    # the same figures on the model's training run, in one request
    now = int(time.time() * 1000)
    found = [Metric(key, value, now, 0) for key, value in runs.finite_metrics(flat).items()]
    mlflow.MlflowClient().log_batch(target["run_id"], metrics=found)
    registry.set_version_tags(
        target["name"],
        target["version"],
        figure_tags(f"anchor_{metrics['split']}", metrics),
    )
    write_json(stage_dir(cfg, STAGE) / "metrics.json", {"model_version": target["version"], **metrics})
    write_json(stage_dir(cfg, STAGE) / "lineage.json", lineage_key(cfg))
    log.info("v%s on anchor %s: mAP50 %.4f", target["version"], metrics["split"], metrics["map50"])
    return {**metrics, "objective": metrics["map50"]}


main = hydra_entry(run)

if __name__ == "__main__":
    main()
