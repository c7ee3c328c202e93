"""Evaluate predictions in FiftyOne and build the views a reviewer looks at.

* :func:`evaluate` runs ``evaluate_detections`` (COCO method, mAP) with one eval key per prediction
  field (``predictions_v7`` -> ``eval_v7``), so every version's per-sample TP/FP/FN counts stay side
  by side; :func:`figures` reads mAP50 and mAP50-95 from the results the way the gate computes them.
* :func:`top_classes` and :func:`report` give the classification report of the most frequent classes.
* :func:`worst_samples` sorts by false negatives or false positives, :func:`class_patches` shows the
  evaluation patches of one class, :func:`compare` puts a base and a candidate version side by side.

FiftyOne's COCO evaluation is configured like the gate's evaluator (IoU 0.50:0.95, 101 recall
points, 100 best predictions per image and class, classes without ground truth left out of the
mean), so ``figures()`` equals the gate's ``map50`` / ``map50_95`` for the same predictions.
"""

from __future__ import annotations

import logging

import numpy as np
from omegaconf import DictConfig

from detloop.core.errors import BadInput
from detloop.fiftyone.load import GT_FIELD

log = logging.getLogger(__name__)


def eval_key(pred_field: str) -> str:
    """``predictions_v7`` -> ``eval_v7`` (``predictions_x`` -> ``eval_x``)."""
    return "eval_" + pred_field.removeprefix("predictions_")


def _check_field(samples, field: str) -> None:
    if not samples.has_field(field):
        fields = sorted(k for k in samples.get_field_schema() if k.startswith(("predictions_", GT_FIELD)))
        raise BadInput(
            f"{samples.name if hasattr(samples, 'name') else 'dataset'} has no field {field!r}",
            [f"label fields there: {', '.join(fields) or 'none'}"],
        )


def evaluate(
    samples,
    pred_field: str,
    cfg: DictConfig | None = None,
    *,
    gt_field: str = GT_FIELD,
    key: str | None = None,
    classes: list[str] | None = None,
    compute_mAP: bool | None = None,  # noqa: N803  (FiftyOne's name)
    iou: float | None = None,
):
    """``evaluate_detections`` of ``pred_field`` against ``gt_field`` under ``key`` (default
    :func:`eval_key`); re-running replaces that key's results. Returns FiftyOne's results.

    ``compute_mAP`` (default ``fiftyone.evaluate.compute_mAP``) and ``iou`` (the IoU of the per-sample
    TP/FP/FN matching; FiftyOne's default 0.5) override the configuration."""
    for field in (pred_field, gt_field):
        _check_field(samples, field)
    ev = cfg.fiftyone.evaluate if cfg is not None else None
    key = key or eval_key(pred_field)
    dataset = samples._dataset
    if key in dataset.list_evaluations():
        dataset.delete_evaluation(key)
    if compute_mAP is None:
        compute_mAP = bool(ev.compute_mAP) if ev else True  # noqa: N806
    extra = {"iou": float(iou)} if iou is not None else {}
    return samples.evaluate_detections(
        pred_field,
        gt_field=gt_field,
        eval_key=key,
        method=str(ev.method) if ev else "coco",
        compute_mAP=compute_mAP,
        max_preds=int(ev.max_preds) if ev else 100,
        classes=classes,
        progress=False,
        **extra,
    )


def figures(results) -> dict:
    """mAP50 and mAP50-95 of COCO-method results (classes without ground truth left out, as the gate)."""
    precision = np.asarray(results.precision)  # (IoU thresholds, classes, 101 recall points); -1 = no GT
    if precision.size == 0:
        return {"map50": -1.0, "map50_95": -1.0, "per_class_ap50": {}}
    has_gt = (precision > -1).any(axis=(0, 2))
    ap = precision.mean(axis=2)  # (T, K)
    at50 = int(np.argmin(np.abs(np.asarray(results.iou_threshs) - 0.5)))
    return {
        "map50": float(ap[at50, has_gt].mean()) if has_gt.any() else -1.0,
        "map50_95": float(results.mAP()),
        "per_class_ap50": {str(c): float(ap[at50, k]) for k, c in enumerate(results.classes) if has_gt[k]},
    }


def top_classes(samples, n: int, gt_field: str = GT_FIELD) -> list[str]:
    """The ``n`` classes with the most ground-truth objects (ties by name)."""
    counts = samples.count_values(f"{gt_field}.detections.label")
    return sorted((c for c in counts if c is not None), key=lambda c: (-counts[c], c))[: int(n)]


def report(results, samples, n: int = 10, gt_field: str = GT_FIELD, conf: float | None = None) -> dict:
    """The classification report (precision, recall, F1, support) of the ``n`` most frequent classes.

    With ``conf``, only predictions at or above that confidence count (what the served model shows):
    a match made by a lower-confidence prediction becomes a miss, a lower-confidence false positive
    is dropped. The matching itself is unchanged, and that is exact: COCO matching takes predictions
    by descending confidence, so removing the weaker ones cannot change what the stronger ones matched.
    Without ``conf`` every loaded prediction counts (mAP needs them down to conf 0.001, which makes
    precision meaningless).
    """
    classes = top_classes(samples, n, gt_field)
    if not classes:
        return {}
    if conf is None:
        return results.report(classes=classes)
    from sklearn.metrics import classification_report

    missing = results.missing
    ytrue, ypred = np.asarray(results.ytrue, dtype=object), np.asarray(results.ypred, dtype=object).copy()
    confs = np.array([np.nan if c is None else float(c) for c in results.confs], dtype=float)
    weak = confs < float(conf)  # NaN (a missed object) compares False: kept as it is
    ypred[weak & (ytrue != missing)] = missing
    keep = ~(weak & (ytrue == missing))
    return classification_report(ytrue[keep], ypred[keep], labels=classes, output_dict=True, zero_division=0)


def format_report(rep: dict) -> str:
    """A report dict as a fixed-width table (what ``print_report`` shows)."""
    lines = [f"{'':>14} {'precision':>9} {'recall':>9} {'f1-score':>9} {'support':>9}"]
    for name, row in rep.items():
        if isinstance(row, dict):
            lines.append(
                f"{name:>14} {row['precision']:9.2f} {row['recall']:9.2f} {row['f1-score']:9.2f} "
                f"{int(row['support']):9d}"
            )
    return "\n".join(lines)


def worst_samples(samples, key: str, kind: str = "fn"):
    """Samples sorted by the number of false negatives (``fn``) or false positives (``fp``) under ``key``."""
    if kind not in ("fn", "fp", "tp"):
        raise BadInput(f"kind={kind!r}: expected fn, fp or tp")
    field = f"{key}_{kind}"
    if not samples.has_field(field):
        raise BadInput(f"no evaluation {key!r} on this dataset", [f"run evaluate() first; missing field {field}"])
    return samples.sort_by(field, reverse=True)


def class_patches(samples, key: str, label: str, pred_field: str, gt_field: str = GT_FIELD):
    """The evaluation patches (TP / FP / FN crops) of one class under ``key``."""
    from fiftyone import ViewField as F  # noqa: N817

    view = samples.filter_labels(gt_field, F("label") == label, only_matches=False).filter_labels(
        pred_field, F("label") == label, only_matches=False
    )
    return view.to_evaluation_patches(key)


def compare(
    samples, base_field: str, candidate_field: str, cfg: DictConfig | None = None, gt_field: str = GT_FIELD
) -> dict:
    """Base vs candidate on the same samples: both evaluated (own eval keys), figures side by side,
    and the views where the candidate finds fewer / more objects than the base."""
    from fiftyone import ViewField as F  # noqa: N817

    out = {}
    for role, field in (("base", base_field), ("candidate", candidate_field)):
        results = evaluate(samples, field, cfg, gt_field=gt_field)
        out[role] = {"field": field, "key": eval_key(field), **figures(results)}
    b, c = out["base"]["key"], out["candidate"]["key"]
    out["candidate_worse"] = samples.match(F(f"{c}_tp") < F(f"{b}_tp")).sort_by(
        F(f"{b}_tp") - F(f"{c}_tp"), reverse=True
    )
    out["candidate_better"] = samples.match(F(f"{c}_tp") > F(f"{b}_tp"))
    out["map50_change"] = out["candidate"]["map50"] - out["base"]["map50"]
    return out
