"""One model measured on one labelled image set: the figures every evaluation in detloop reports.

The ``evaluate`` stage, the gates, ``detloop inspect`` and the benchmarks all measure through
:func:`measure` (one prediction pass, :mod:`detloop.evaluation.evaluator`), so a model has one
anchor-test mAP50 wherever it is shown: the registry table, ``dvc metrics show``, the gate's report.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from omegaconf import DictConfig

from detloop.core.config import resolve_path
from detloop.core.errors import BadInput
from detloop.core.stage import stage_dir
from detloop.data.datasets import anchor_images, anchor_names
from detloop.evaluation import evaluator, predictions
from detloop.model.pyfunc import model_weights

log = logging.getLogger(__name__)


def predict(cfg: DictConfig, weights: Path, imgsz: int, images: list[Path], *, hit: dict | None = None) -> list:
    """One model's detections on ``images`` with the ``conf/evaluate`` settings every measurement uses.

    A pass already made for the same weights, images and settings is reused (``evaluate.cache``,
    :mod:`detloop.evaluation.predictions`); ``hit`` (a dict) receives ``cached``: whether it was.
    """
    ev = cfg.evaluate
    folder, keep = predictions.cache_settings(cfg)
    dets, cached = predictions.cached_predict(
        folder,
        weights,
        images,
        keep=keep,
        imgsz=imgsz,
        batch=int(ev.batch),
        device=ev.device,
        conf=float(ev.conf),
        iou=float(ev.iou),
        max_det=int(ev.max_det),
    )
    if hit is not None:
        hit["cached"] = cached
    return dets


def measure(
    cfg: DictConfig, weights: Path, imgsz: int, images: list[Path], names: dict[int, str], keep: dict | None = None
) -> dict:
    """AP (COCO-style) and detection rates of one model on one set, from one prediction pass.

    The prediction settings are ``conf/evaluate`` (batch, conf floor, NMS IoU, max_det, device) for
    every caller; the detection rate counts predictions at the serving confidence
    (``gate.new_samples.conf``) matching an object of their class at ``gate.new_samples.iou``.
    ``keep`` (a dict) receives the ``images``, ``ground_truth`` and ``detections`` for reuse (the label check).
    """
    if not images:
        return {"images": 0, "objects": 0}
    gts = evaluator.load_ground_truth(images, num_classes=max(names) + 1)
    started, hit = time.perf_counter(), {}
    dets = predict(cfg, weights, imgsz, images, hit=hit)
    inference_s = time.perf_counter() - started
    if keep is not None:  # the caller reuses the predictions (detloop.evaluation.label_check): no second pass
        keep.update(images=list(images), ground_truth=gts, detections=dets)
    figures = score(cfg, gts, dets, names)
    figures["timings"]["inference_s"] = inference_s
    figures["timings"]["predictions_cached"] = hit["cached"]
    return figures


def score(cfg: DictConfig, gts: list, dets: list, names: dict[int, str]) -> dict:
    """The figures :func:`measure` reports, from ground truth and a prediction pass already made."""
    found = evaluator.evaluate_predictions(
        gts, dets, names, serving_conf=float(cfg.gate.new_samples.conf), match_iou=float(cfg.gate.new_samples.iou)
    )
    return {
        "images": found["images"],
        "objects": found["objects"],
        "map50": found["map50"],
        "map50_95": found["map50_95"],
        "ap50": {k: v["ap50"] for k, v in found["per_class"].items() if v["n_gt"] > 0},
        "ap50_95": {k: v["ap50_95"] for k, v in found["per_class"].items() if v["n_gt"] > 0},
        "detection_rate": found["detection_rate"]["rate"],
        "detection_rate_any_class": found["detection_rate_any_class"]["rate"],
        "detection_rate_per_class": {  # in class-id order, like ap50
            name: found["detection_rate"]["per_class"][name]["rate"]
            for name in names.values()
            if name in found["detection_rate"]["per_class"]
        },
        "timings": {"metrics_s": found["timings"]["metrics_s"]},
    }


def predict_split(cfg: DictConfig, weights: Path, imgsz: int, split: str | None = None) -> bool:
    """Make (and keep) ``weights``' pass on an anchor split (``evaluate.split`` by default) for a later
    :func:`evaluate_model` of the same weights; False when the prediction cache is off or the split is empty.
    """
    if predictions.cache_settings(cfg)[0] is None:
        return False
    split = split or str(cfg.evaluate.split)
    images = anchor_images(resolve_path(cfg, "anchor"), split)
    if not images:
        return False
    started = time.perf_counter()
    predict(cfg, Path(weights), imgsz, images)
    log.info("anchor %s pass kept for evaluate: %.2f s", split, time.perf_counter() - started)
    return True


def evaluate_model(cfg: DictConfig, model_uri: str, split: str | None = None) -> dict:
    """The figures of the registered ``model_uri`` on an anchor split (``evaluate.split`` by default).

    Returns ``{split, images, objects, map50, map50_95, detection_rate, per_class: {name: {ap50,
    ap50_95, detection_rate}}}``.
    """
    split = split or str(cfg.evaluate.split)
    anchor = resolve_path(cfg, "anchor")
    images = anchor_images(anchor, split)
    if not images:
        raise BadInput(f"no anchor {split} split to evaluate on", [f"{anchor / 'images' / split}: no images"])
    names = anchor_names(anchor)
    with tempfile.TemporaryDirectory(dir=stage_dir(cfg, "evaluate")) as tmp:
        weights, config = model_weights(model_uri, Path(tmp))
        found = measure(cfg, weights, int(config.get("imgsz", 640)), images, names)
    per_class = {
        name: {
            "ap50": found["ap50"][name],
            "ap50_95": found["ap50_95"][name],
            "detection_rate": found["detection_rate_per_class"].get(name, float("nan")),
        }
        for name in found["ap50"]
    }
    keys = ("images", "objects", "map50", "map50_95", "detection_rate", "detection_rate_any_class")
    return {"split": split, **{k: found[k] for k in keys}, "per_class": per_class}


def figure_tags(set_name: str, found: dict) -> dict[str, str]:
    """``eval.<set>.map50`` / ``.map50_95`` version tags: the figures ``detloop registry`` shows."""
    return {f"eval.{set_name}.{key}": f"{found[key]:.4f}" for key in ("map50", "map50_95")}
