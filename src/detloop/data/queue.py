"""The review queue's ordering rules, on plain arrays: which reports would teach the model most.

Every report waiting in the inbox gets a **value score** in [0, 1], the weighted mean
(``inbox.queue.weights``) of two components, each in [0, 1]:

* **uncertainty** of the production model on the report: the weighted mean (``inbox.queue.uncertainty``)
  of the parts that apply,

  - ``peak``: the most uncertain box; a box with confidence ``c`` is uncertain by
    ``max(0, 1 - |c - t| / band)`` (1 at the serving confidence ``t``, 0 at ``band`` from it),
  - ``mean``: the mean box uncertainty over the boxes read (confidence >= ``inbox.queue.conf``),
  - ``low_only``: the share of the model's boxes that exist only below ``t`` (no served box over them),
  - ``disagreement`` (reports with proposed labels only): ``1 - matched / max(served, proposed)``,
    boxes matched one to one by class and IoU;

* **novelty** against the anchor: ``d / (d + s)``, with ``d`` the Euclidean distance of the report's
  embedding (the detector's own backbone features, :mod:`detloop.model.embed`) to its nearest
  anchor-train image and ``s`` the anchor's own spacing, the median distance of an anchor-train image
  to its nearest other one. So 0.5 means "as far from the anchor as anchor images are from each
  other", and more is new ground. Euclidean, not cosine: a model that sees little on a degraded
  domain answers with weaker activations everywhere, a change of length more than of direction.

A report whose fingerprint (:mod:`detloop.model.embed`: the layout of that one image in an early
layer) has a cosine similarity of at least ``inbox.queue.duplicate_cos`` with an already reviewed
image's (pool or rejected) is a **near-duplicate**: it goes last whatever its score, with the reason
(``near-duplicate of pool/<id> (cos 0.998)``). The order: other reports by score, highest first, then
the near-duplicates by score; ties keep arrival order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from omegaconf import DictConfig

from detloop.core.errors import BadInput

COMPONENTS = ("uncertainty", "novelty")
PARTS = ("peak", "mean", "low_only", "disagreement")
CHUNK_ROWS = 1024  # query rows per similarity product: bounds memory for large anchors


# --------------------------------------------------------------------------- the rules (config)


@dataclass(frozen=True)
class QueueRules:
    """The values the ordering uses (``inbox.queue`` and the serving confidence), checked."""

    serve_conf: float
    floor: float
    band: float
    iou: float
    weights: Mapping[str, float]
    parts: Mapping[str, float]
    duplicate_cos: float

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> QueueRules:
        """The rules of ``cfg.inbox.queue`` with the serving confidence ``cfg.gate.new_samples.conf``;
        BadInput naming every bad key."""
        q = cfg.inbox.queue
        rules = cls(
            serve_conf=float(cfg.gate.new_samples.conf),
            floor=float(q.conf),
            band=float(q.band),
            iou=float(q.iou),
            weights={k: float(q.weights[k]) for k in COMPONENTS},
            parts={k: float(q.uncertainty[k]) for k in PARTS},
            duplicate_cos=float(q.duplicate_cos),
        )
        problems = rules.problems()
        if problems:
            raise BadInput("inbox.queue: bad values", problems)
        return rules

    def problems(self) -> list[str]:
        found = []
        if not 0.0 <= self.floor < self.serve_conf:
            found.append(
                f"inbox.queue.conf={self.floor:g}: must be >= 0 and below the serving confidence "
                f"gate.new_samples.conf={self.serve_conf:g}"
            )
        if not self.band > 0:
            found.append(f"inbox.queue.band={self.band:g}: must be > 0")
        if not 0 < self.iou <= 1:
            found.append(f"inbox.queue.iou={self.iou:g}: must be in (0, 1]")
        if not -1 <= self.duplicate_cos <= 1:
            found.append(f"inbox.queue.duplicate_cos={self.duplicate_cos:g}: a cosine similarity, in [-1, 1]")
        for group, values in (("weights", self.weights), ("uncertainty", self.parts)):
            negative = [f"inbox.queue.{group}.{k}={v:g}: must be >= 0" for k, v in values.items() if v < 0]
            found += negative
            if not negative and not sum(values.values()) > 0:
                found.append(f"inbox.queue.{group}: at least one weight must be > 0")
        return found


# --------------------------------------------------------------------------- boxes


def yolo_to_xyxy(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """YOLO label rows ``cls xc yc w h`` (normalized) -> (normalized xyxy boxes (N, 4), class ids (N,))."""
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, 5)
    xc, yc, w, h = rows[:, 1], rows[:, 2], rows[:, 3], rows[:, 4]
    boxes = np.stack([xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2], axis=1)
    return boxes, rows[:, 0].astype(np.int64)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` (N, 4) with every box of ``b`` (M, 4), xyxy; (N, M)."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1, 4), np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(axis=1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def box_uncertainty(conf: np.ndarray, serve_conf: float, band: float) -> np.ndarray:
    """Per box: 1 at the serving confidence, falling linearly to 0 at ``band`` from it."""
    conf = np.asarray(conf, dtype=np.float64).reshape(-1)
    return np.clip(1.0 - np.abs(conf - serve_conf) / band, 0.0, 1.0)


def low_only_share(boxes: np.ndarray, conf: np.ndarray, serve_conf: float, iou: float) -> float:
    """Share of the boxes that exist only below the serving confidence: under it, and overlapping no
    served box (of any class) with IoU >= ``iou``. 0 when there are no boxes."""
    conf = np.asarray(conf, dtype=np.float64).reshape(-1)
    if not len(conf):
        return 0.0
    served = conf >= serve_conf
    low = ~served
    if served.any() and low.any():
        covered = (iou_matrix(np.asarray(boxes)[low], np.asarray(boxes)[served]) >= iou).any(axis=1)
        low[np.flatnonzero(low)[covered]] = False
    return float(low.sum() / len(conf))


def matched_pairs(a_boxes, a_cls, b_boxes, b_cls, iou: float) -> int:
    """Boxes of ``a`` and ``b`` matched one to one (same class, IoU >= ``iou``, largest IoU first)."""
    overlap = iou_matrix(a_boxes, b_boxes)
    if not overlap.size:
        return 0
    overlap[np.asarray(a_cls).reshape(-1, 1) != np.asarray(b_cls).reshape(1, -1)] = 0.0
    pairs = np.argwhere(overlap >= iou)
    order = np.argsort(-overlap[pairs[:, 0], pairs[:, 1]], kind="stable")
    used_a, used_b = set(), set()
    for i, j in pairs[order]:
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
    return len(used_a)


def disagreement(
    boxes: np.ndarray, cls: np.ndarray, conf: np.ndarray, proposed: tuple[np.ndarray, np.ndarray], rules: QueueRules
) -> float:
    """``1 - matched / max(served, proposed)``: how far the served boxes are from the proposed labels."""
    served = np.asarray(conf).reshape(-1) >= rules.serve_conf
    p_boxes, p_cls = proposed
    largest = max(int(served.sum()), len(p_cls))
    if largest == 0:
        return 0.0
    matched = matched_pairs(np.asarray(boxes)[served], np.asarray(cls)[served], p_boxes, p_cls, rules.iou)
    return 1.0 - matched / largest


# --------------------------------------------------------------------------- the components


@dataclass(frozen=True)
class Uncertainty:
    """The model's uncertainty on one report: its parts (``disagreement`` None without proposed labels)."""

    value: float
    peak: float
    mean: float
    low_only: float
    disagreement: float | None
    boxes: int  # boxes read (confidence >= the floor)
    served: int  # of them at or above the serving confidence

    def parts(self) -> dict[str, float]:
        found = {"peak": self.peak, "mean": self.mean, "low_only": self.low_only}
        return found if self.disagreement is None else {**found, "disagreement": self.disagreement}


def uncertainty(
    boxes: np.ndarray,
    cls: np.ndarray,
    conf: np.ndarray,
    proposed: tuple[np.ndarray, np.ndarray] | None,
    rules: QueueRules,
) -> Uncertainty:
    """The uncertainty of one report from the model's boxes down to the floor (normalized xyxy, class
    ids, confidences) and the proposed labels (boxes, classes) when the report came with some."""
    conf = np.asarray(conf, dtype=np.float64).reshape(-1)
    keep = conf >= rules.floor
    boxes, cls, conf = np.asarray(boxes).reshape(-1, 4)[keep], np.asarray(cls).reshape(-1)[keep], conf[keep]
    per_box = box_uncertainty(conf, rules.serve_conf, rules.band)
    found = {
        "peak": float(per_box.max()) if len(per_box) else 0.0,
        "mean": float(per_box.mean()) if len(per_box) else 0.0,
        "low_only": low_only_share(boxes, conf, rules.serve_conf, rules.iou),
    }
    if proposed is not None:
        found["disagreement"] = disagreement(boxes, cls, conf, proposed, rules)
    weights = {k: rules.parts[k] for k in found if rules.parts[k] > 0}
    value = sum(found[k] * w for k, w in weights.items()) / sum(weights.values()) if weights else 0.0
    return Uncertainty(
        value=float(value),
        peak=found["peak"],
        mean=found["mean"],
        low_only=found["low_only"],
        disagreement=found.get("disagreement"),
        boxes=len(conf),
        served=int((conf >= rules.serve_conf).sum()),
    )


def nearest_cosine(queries: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each unit row of ``queries``, the index of its most similar unit row of ``reference`` and
    the cosine similarity; (-1, -inf) when ``reference`` is empty."""
    queries, reference = np.asarray(queries, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if not len(reference):
        return np.full(len(queries), -1), np.full(len(queries), -np.inf)
    index, cos = np.empty(len(queries), dtype=np.int64), np.empty(len(queries))
    for start in range(0, len(queries), CHUNK_ROWS):
        sims = queries[start : start + CHUNK_ROWS] @ reference.T
        index[start : start + CHUNK_ROWS] = sims.argmax(axis=1)
        cos[start : start + CHUNK_ROWS] = sims.max(axis=1)
    return index, np.clip(cos, -1.0, 1.0)


def _squared_distances(queries: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(len(queries), len(reference)) squared Euclidean distances, in float64 (embeddings of an
    untrained model differ in the fifth digit: float32 would round them to zero)."""
    q2 = (queries * queries).sum(axis=1)[:, None]
    r2 = (reference * reference).sum(axis=1)[None, :]
    return np.clip(q2 + r2 - 2.0 * (queries @ reference.T), 0.0, None)


def nearest_euclidean(queries: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``queries``, the index of its nearest row of ``reference`` and the Euclidean
    distance; (-1, inf) when ``reference`` is empty."""
    queries, reference = np.asarray(queries, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if not len(reference):
        return np.full(len(queries), -1), np.full(len(queries), np.inf)
    index, dist = np.empty(len(queries), dtype=np.int64), np.empty(len(queries))
    for start in range(0, len(queries), CHUNK_ROWS):
        squared = _squared_distances(queries[start : start + CHUNK_ROWS], reference)
        index[start : start + CHUNK_ROWS] = squared.argmin(axis=1)
        dist[start : start + CHUNK_ROWS] = np.sqrt(squared.min(axis=1))
    return index, dist


def anchor_spacing(anchor: np.ndarray, max_samples: int = 2000, seed: int = 0) -> float:
    """The anchor's own spacing: the median Euclidean distance of an anchor embedding to its nearest
    other one (on at most ``max_samples`` of them, drawn with ``seed``). 0 for fewer than 2."""
    vectors = np.asarray(anchor, dtype=np.float64)
    if len(vectors) < 2:
        return 0.0
    if len(vectors) > max_samples:
        vectors = vectors[np.sort(np.random.default_rng(seed).choice(len(vectors), max_samples, replace=False))]
    best = np.empty(len(vectors))
    for start in range(0, len(vectors), CHUNK_ROWS):
        squared = _squared_distances(vectors[start : start + CHUNK_ROWS], vectors)
        rows = np.arange(start, start + len(squared))
        squared[rows - start, rows] = np.inf  # not itself
        best[rows] = np.sqrt(squared.min(axis=1))
    return float(np.median(best))


@dataclass(frozen=True)
class Novelty:
    """How far a report is from the anchor: Euclidean distance to the nearest anchor-train embedding."""

    value: float
    distance: float
    spacing: float
    nearest: str

    @property
    def ratio(self) -> float:
        """The distance in units of the anchor's own spacing."""
        return self.distance / self.spacing if self.spacing > 0 else float("inf")


def novelty(distance: float, spacing: float, nearest_id: str) -> Novelty:
    """``d / (d + s)``: 0 on an anchor image, 0.5 at the anchor's own spacing, towards 1 far away."""
    distance = max(float(distance), 0.0)
    total = distance + spacing
    value = distance / total if total > 0 else 0.0
    return Novelty(float(value), distance, float(spacing), nearest_id)


@dataclass(frozen=True)
class Duplicate:
    """The reviewed image a report nearly duplicates (``pool/<id>`` or ``rejected/<id>``) and how close."""

    of: str
    cos: float


# --------------------------------------------------------------------------- the order


@dataclass(frozen=True)
class Entry:
    """One report's place in the queue and why."""

    id: str
    arrival: int  # position in the inbox manifest
    score: float
    uncertainty: Uncertainty
    novelty: Novelty
    duplicate: Duplicate | None

    @property
    def reason(self) -> str:
        u, n = self.uncertainty, self.novelty
        parts = ", ".join(f"{k.replace('_', '-')} {v:.2f}" for k, v in u.parts().items())
        ratio = f"{n.ratio:.1f}x" if np.isfinite(n.ratio) else "inf x"
        text = (
            f"score {self.score:.2f}: uncertainty {u.value:.2f} ({parts}; {u.served}/{u.boxes} boxes served), "
            f"novelty {n.value:.2f} ({ratio} the anchor's spacing from its nearest anchor image {n.nearest})"
        )
        if self.duplicate is not None:
            text = f"near-duplicate of {self.duplicate.of} (cos {self.duplicate.cos:.3f}); {text}"
        return text

    def as_dict(self, rank: int) -> dict:
        u, n, d = self.uncertainty, self.novelty, self.duplicate
        return {
            "rank": rank,
            "id": self.id,
            "score": round(self.score, 6),
            "uncertainty": {"value": round(u.value, 6), **{k: round(v, 6) for k, v in u.parts().items()}}
            | {"boxes": u.boxes, "served": u.served},
            "novelty": {
                "value": round(n.value, 6),
                "distance": round(n.distance, 6),
                "spacing": round(n.spacing, 6),
                "nearest_anchor": n.nearest,
            },
            "duplicate_of": None if d is None else {"id": d.of, "cos": round(d.cos, 6)},
            "reason": self.reason,
        }


def score(u: Uncertainty, n: Novelty, rules: QueueRules) -> float:
    """The value score: the weighted mean of uncertainty and novelty (``inbox.queue.weights``)."""
    w = rules.weights
    return (w["uncertainty"] * u.value + w["novelty"] * n.value) / (w["uncertainty"] + w["novelty"])


def entry(
    sample_id: str,
    arrival: int,
    u: Uncertainty,
    n: Novelty,
    reviewed: tuple[str, float] | None,
    rules: QueueRules,
) -> Entry:
    """One report's entry; ``reviewed`` is its most similar reviewed image and the cosine similarity."""
    duplicate = None
    if reviewed is not None and reviewed[1] >= rules.duplicate_cos:
        duplicate = Duplicate(reviewed[0], float(reviewed[1]))
    return Entry(sample_id, arrival, float(score(u, n, rules)), u, n, duplicate)


def order(entries: Sequence[Entry]) -> list[Entry]:
    """Highest score first, near-duplicates of reviewed images last; ties keep arrival order."""
    return sorted(entries, key=lambda e: (e.duplicate is not None, -round(e.score, 12), e.arrival))


def saved_order(saved: Sequence[str], waiting: Sequence[str]) -> tuple[list[str], list[str]]:
    """The waiting ids in a saved queue's order, then those the saved queue did not rank (arrival
    order); returns ``(ordered ids, unranked ids)``."""
    waiting_set = set(waiting)
    ranked = [i for i in dict.fromkeys(saved) if i in waiting_set]
    known = set(ranked)
    unranked = [i for i in waiting if i not in known]
    return ranked + unranked, unranked
