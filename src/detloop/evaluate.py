"""Stage ``evaluate``: the registered model on the anchor test split.

Writes mAP50, mAP50-95 and per-class precision / recall / AP as DVC metrics
(``build/evaluate/metrics.json``) and logs them to MLflow: an ``evaluate`` run of its own, the
model's training run (so the compare view shows them next to training curves) and version tags.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import mlflow
from omegaconf import DictConfig

from detloop.core.config import config_hash
from detloop.core.stage import hydra_entry, read_json, stage_dir, write_json
from detloop.data.datasets import anchor_yaml
from detloop.data.manifest import sha256_file
from detloop.model.pyfunc import model_weights
from detloop.model.yolo import ultralytics
from detloop.tracking import registry, runs

log = logging.getLogger(__name__)

STAGE = "evaluate"


def per_class_metrics(box, names: dict[int, str]) -> dict[str, dict[str, float]]:
    """Ultralytics box metrics per class (classes without test objects are left out)."""
    out = {}
    for i, cid in enumerate(box.ap_class_index.tolist()):
        p, r, ap50, ap = box.class_result(i)
        out[names[int(cid)]] = {"precision": float(p), "recall": float(r), "ap50": float(ap50), "ap50_95": float(ap)}
    return out


def evaluate_model(cfg: DictConfig, model_uri: str) -> dict:
    """mAP50, mAP50-95, precision, recall and per-class figures of ``model_uri`` on the anchor split."""
    out = stage_dir(cfg, STAGE)
    data_yaml = anchor_yaml(cfg, out)
    ev = cfg.evaluate
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        weights, config = model_weights(model_uri, Path(tmp))
        model = ultralytics().YOLO(str(weights))
        result = model.val(
            data=str(data_yaml),
            split=ev.split,
            imgsz=int(config.get("imgsz", 640)),
            batch=ev.batch,
            conf=ev.conf,
            iou=ev.iou,
            device=ev.device,
            plots=False,
            verbose=False,
            project=str(out / "runs"),
            name="val",
            exist_ok=True,
        )
    box = result.box
    names = {int(k): v for k, v in model.names.items()}
    return {
        "split": ev.split,
        "map50": float(box.map50),
        "map50_95": float(box.map),
        "precision": float(box.mp),
        "recall": float(box.mr),
        "per_class": per_class_metrics(box, names),
    }


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
    flat = {f"anchor_{metrics['split']}/{k}": metrics[k] for k in ("map50", "map50_95", "precision", "recall")}
    for cls, values in metrics["per_class"].items():
        flat.update({f"anchor_{metrics['split']}/{cls}/{k}": v for k, v in values.items()})
    with runs.stage_run(cfg, STAGE, experiment_id, run_name=f"evaluate v{target['version']}"):
        mlflow.set_tags({"model_version": target["version"], "model_uri": target["model_uri"]})
        mlflow.log_params(runs.flat_params(cfg, ["evaluate"]))
        mlflow.log_metrics(runs.finite_metrics(flat))
        mlflow.log_dict(metrics, "evaluate/metrics.json")
    client = mlflow.MlflowClient()
    for key, value in runs.finite_metrics(flat).items():
        client.log_metric(target["run_id"], key, value)
    registry.set_version_tags(
        target["name"],
        target["version"],
        {
            f"eval.anchor_{metrics['split']}.map50": f"{metrics['map50']:.4f}",
            f"eval.anchor_{metrics['split']}.map50_95": f"{metrics['map50_95']:.4f}",
        },
    )
    write_json(stage_dir(cfg, STAGE) / "metrics.json", {"model_version": target["version"], **metrics})
    write_json(stage_dir(cfg, STAGE) / "lineage.json", lineage_key(cfg))
    log.info("v%s on anchor %s: mAP50 %.4f", target["version"], metrics["split"], metrics["map50"])
    return {**metrics, "objective": metrics["map50"]}


main = hydra_entry(run)

if __name__ == "__main__":
    main()
