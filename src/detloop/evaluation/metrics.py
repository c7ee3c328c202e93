"""Detection rate: the share of ground-truth objects a model finds (Gate 2, monitoring, benchmarks).

An object is found when a prediction of the same class (or any class, for the class-agnostic
diagnostic) with confidence >= ``conf`` overlaps it with IoU >= ``iou``. Matching is one-to-one,
highest confidence first, as in COCO evaluation.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` (N,4 xyxy) with every box in ``b`` (M,4 xyxy)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    tl = np.maximum(a[:, None, :2], b[None, :, :2])
    br = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(br - tl, 0, None).prod(axis=2)
    area_a = (a[:, 2:] - a[:, :2]).prod(axis=1)
    area_b = (b[:, 2:] - b[:, :2]).prod(axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def found_objects(
    gt_boxes: np.ndarray,
    gt_cls: np.ndarray,
    pred_boxes: np.ndarray,
    pred_cls: np.ndarray,
    pred_conf: np.ndarray,
    *,
    iou: float = 0.5,
    conf: float = 0.25,
    class_aware: bool = True,
) -> np.ndarray:
    """Boolean per ground-truth object: was it found by a distinct prediction?"""
    found = np.zeros(len(gt_boxes), dtype=bool)
    keep = pred_conf >= conf
    pred_boxes, pred_cls, pred_conf = pred_boxes[keep], pred_cls[keep], pred_conf[keep]
    if len(gt_boxes) == 0 or len(pred_boxes) == 0:
        return found
    overlaps = iou_matrix(pred_boxes, gt_boxes)
    if class_aware:
        overlaps = np.where(pred_cls[:, None] == gt_cls[None, :], overlaps, 0.0)
    for p in np.argsort(-pred_conf, kind="stable"):
        candidates = np.where(~found, overlaps[p], 0.0)
        best = int(np.argmax(candidates))
        if candidates[best] >= iou:
            found[best] = True
    return found


@dataclass
class DetectionRate:
    """Counts of found / total ground-truth objects, overall and per class name."""

    found: int = 0
    total: int = 0
    per_class: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))

    def add(self, found: np.ndarray, gt_cls: np.ndarray, names: dict[int, str]) -> None:
        self.found += int(found.sum())
        self.total += len(found)
        for hit, cls in zip(found.tolist(), gt_cls.tolist(), strict=True):
            counts = self.per_class[names.get(int(cls), str(int(cls)))]
            counts[0] += int(hit)
            counts[1] += 1

    @property
    def rate(self) -> float:
        return self.found / self.total if self.total else float("nan")

    def as_dict(self) -> dict:
        return {
            "rate": self.rate,
            "found": self.found,
            "total": self.total,
            "per_class": {
                k: {"rate": f / t if t else float("nan"), "found": f, "total": t}
                for k, (f, t) in sorted(self.per_class.items())
            },
        }


def detection_rate(
    samples: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    names: dict[int, str],
    *,
    iou: float = 0.5,
    conf: float = 0.25,
    class_aware: bool = True,
) -> DetectionRate:
    """Detection rate over ``(gt_boxes, gt_cls, pred_boxes, pred_cls, pred_conf)`` per image."""
    total = DetectionRate()
    for gt_boxes, gt_cls, pred_boxes, pred_cls, pred_conf in samples:
        hits = found_objects(
            gt_boxes, gt_cls, pred_boxes, pred_cls, pred_conf, iou=iou, conf=conf, class_aware=class_aware
        )
        total.add(hits, gt_cls, names)
    return total


def yolo_labels_xyxy(label_file, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (pixel xyxy) and class ids of a YOLO txt label file (missing file = no objects)."""
    from pathlib import Path

    path = Path(label_file)
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    if not rows:
        return np.zeros((0, 4)), np.zeros(0, dtype=int)
    arr = np.array(rows, dtype=float)
    xc, yc, w, h = arr[:, 1] * width, arr[:, 2] * height, arr[:, 3] * width, arr[:, 4] * height
    boxes = np.stack([xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2], axis=1)
    return boxes, arr[:, 0].astype(int)
