"""The review queue: the inbox ordered by what each report would teach the model (``detloop review queue``).

:func:`review_queue` runs the production model (or any resolved model, see
:func:`detloop.fiftyone.inspection.resolve_models`) once over the inbox, which gives each report's
detections, its embedding and its fingerprint from the detector's own layers
(:class:`detloop.model.embed.Embedder`); it compares the embeddings with the anchor-train set's
(novelty) and the fingerprints with the reviewed images' (pool and rejected: near-duplicates), and
orders the reports by the rules of :mod:`detloop.data.queue`. The order is saved to
``<inbox.queue.cache>/queue.json``; the file-based review lists the inbox in that order.

Cached under ``inbox.queue.cache``, per model (registry version and weights hash), layers and input
size: the anchor-train embeddings once per anchor manifest hash, and the reviewed images'
fingerprints by content hash (the pool only grows, so each image is fingerprinted once).

:func:`show_in_app` stores each report's rank, score and reason as sample fields of the review
dataset and saves the view ``by-value`` (sorted by rank), which ``detloop review open --app`` opens.
FiftyOne is imported only there.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from detloop.core.config import resolve_path
from detloop.core.env import in_project
from detloop.core.errors import BadInput
from detloop.data import queue as ordering
from detloop.data.datasets import anchor_images
from detloop.data.manifest import MANIFEST, manifest_hash, read_manifest, sha256_file
from detloop.data.store import REJECTED_DIR, REJECTED_MANIFEST, find_image, utc_now
from detloop.fiftyone.load import read_yolo_labels
from detloop.model.embed import Embedder, Views

log = logging.getLogger(__name__)

QUEUE_FILE = "queue.json"
SAVED_VIEW = "by-value"  # the App's saved view of the inbox in queue order
FIELDS = {"rank": "queue_rank", "score": "queue_score", "reason": "queue_reason", "duplicate": "queue_duplicate_of"}


@dataclass(frozen=True)
class AnchorIndex:
    """The anchor-train embeddings: image ids (``train/<stem>``), vectors (N, D) and their own spacing."""

    ids: list[str]
    vectors: np.ndarray
    spacing: float


# --------------------------------------------------------------------------- the queue


def review_queue(cfg: DictConfig, model: dict) -> dict:
    """Order the inbox by value with ``model`` (``{weights, version?, imgsz?, label?}``).

    Returns ``{model, created_at, items: [{rank, id, score, uncertainty, novelty, duplicate_of,
    reason}], counts, seconds}`` (items in queue order) and saves it as ``queue.json``.
    """
    rules = ordering.QueueRules.from_cfg(cfg)
    q, predict = cfg.inbox.queue, cfg.inbox.queue.predict
    inbox = resolve_path(cfg, "inbox")
    rows = read_manifest(inbox / MANIFEST)
    images = [_inbox_image(inbox, row) for row in rows]  # every image is there before the model loads
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    embedder = Embedder(
        model["weights"],
        imgsz=model.get("imgsz"),
        batch=int(predict.batch),
        device=predict.device,
        layers=list(q.embed_layers) if q.embed_layers else None,
        fingerprint_layer=int(q.fingerprint.layer),
        fingerprint_grid=int(q.fingerprint.grid),
    )
    seconds["load"] = time.perf_counter() - started
    folder = cache_folder(cfg, model, embedder)
    anchor = _timed(seconds, "anchor", lambda: anchor_index(cfg, embedder, folder))
    reviewed_ids, reviewed = _timed(seconds, "reviewed", lambda: reviewed_fingerprints(cfg, embedder, folder))
    views = _timed(
        seconds,
        "inbox",
        lambda: embedder.predict(images, conf=rules.floor, iou=float(predict.iou), max_det=int(predict.max_det)),
    )
    started = time.perf_counter()
    entries = score_inbox(rows, inbox, views, anchor, reviewed_ids, reviewed, rules)
    ordered = ordering.order(entries)
    seconds["score"] = time.perf_counter() - started
    result = {
        "model": {k: model.get(k) for k in ("label", "version", "weights", "imgsz")} | {"embedding": embedder.key},
        "created_at": utc_now(),
        "items": [e.as_dict(rank) for rank, e in enumerate(ordered, start=1)],
        "counts": {
            "inbox": len(rows),
            "near_duplicates": sum(e.duplicate is not None for e in entries),
            "anchor_train": len(anchor.ids),
            "reviewed": len(reviewed_ids),
        },
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
    _write_json(queue_path(cfg), result)
    log.info("review queue of %d report(s) with %s: %s", len(rows), model.get("label"), result["seconds"])
    return result


def score_inbox(
    rows: list[dict],
    inbox: Path,
    views: Views,
    anchor: AnchorIndex,
    reviewed_ids: list[str],
    reviewed: np.ndarray,
    rules: ordering.QueueRules,
) -> list[ordering.Entry]:
    """Each report's entry from its detections, embedding and fingerprint (``views``, rows in inbox
    order), the anchor's embeddings and the reviewed images' fingerprints."""
    if not rows:
        return []
    near_anchor, anchor_distance = ordering.nearest_euclidean(views.embeddings, anchor.vectors)
    near_reviewed, reviewed_cos = ordering.nearest_cosine(views.fingerprints, reviewed)
    entries = []
    for i, (row, found) in enumerate(zip(rows, views.found, strict=True)):
        u = ordering.uncertainty(found.boxes, found.cls, found.conf, _proposed(inbox, row), rules)
        n = ordering.novelty(anchor_distance[i], anchor.spacing, anchor.ids[near_anchor[i]])
        similar = (reviewed_ids[near_reviewed[i]], float(reviewed_cos[i])) if near_reviewed[i] >= 0 else None
        entries.append(ordering.entry(row["id"], i, u, n, similar, rules))
    return entries


def _proposed(inbox: Path, row: dict) -> tuple[np.ndarray, np.ndarray] | None:
    label = inbox / "labels" / f"{row['id']}.txt"
    if not row.get("has_labels", True) or not label.is_file():
        return None
    return ordering.yolo_to_xyxy(read_yolo_labels(label))


def _inbox_image(inbox: Path, row: dict) -> Path:
    image = find_image(inbox / "images", row["id"])
    if image is None:
        raise BadInput(f"{row['id']}: its image is missing from {inbox / 'images'} (listed in {inbox / MANIFEST})")
    return image


def _timed(seconds: dict, key: str, fn):
    started = time.perf_counter()
    out = fn()
    seconds[key] = time.perf_counter() - started
    return out


# --------------------------------------------------------------------------- caches


def queue_path(cfg: DictConfig) -> Path:
    """Where the last computed order is saved (``<inbox.queue.cache>/queue.json``)."""
    return in_project(str(cfg.inbox.queue.cache)) / QUEUE_FILE


def cache_folder(cfg: DictConfig, model: dict, embedder: Embedder) -> Path:
    """``<cache>/<v<N> or weights stem>-<weights sha256 prefix>/<layers-imgsz>``: one per model and embedding."""
    weights = Path(model["weights"])
    name = f"v{model['version']}" if model.get("version") else weights.stem
    return in_project(str(cfg.inbox.queue.cache)) / f"{name}-{sha256_file(weights)[:12]}" / embedder.key


def anchor_index(cfg: DictConfig, embedder: Embedder, folder: Path) -> AnchorIndex:
    """The anchor-train embeddings and spacing, computed once per anchor manifest hash (cached in ``folder``)."""
    anchor = resolve_path(cfg, "anchor")
    version = manifest_hash(anchor / MANIFEST)[:12] or "no-manifest"
    samples = int(cfg.inbox.queue.spacing_samples)
    path = folder / f"anchor-train-{version}-s{samples}.npz"
    if path.is_file():
        with np.load(path) as cached:
            return AnchorIndex(cached["ids"].tolist(), cached["vectors"], float(cached["spacing"]))
    images = anchor_images(anchor, "train")
    if not images:
        raise BadInput(f"{anchor / 'images' / 'train'}: no anchor-train images to measure novelty against")
    log.info("embedding %d anchor-train images once (cached in %s)", len(images), path)
    vectors = embedder.embed(images)
    spacing = ordering.anchor_spacing(vectors, samples)
    ids = [str(p.relative_to(anchor / "images").with_suffix("")) for p in images]
    _save_npz(path, ids=np.array(ids), vectors=vectors, spacing=np.array(spacing))
    return AnchorIndex(ids, vectors, spacing)


def reviewed_fingerprints(cfg: DictConfig, embedder: Embedder, folder: Path) -> tuple[list[str], np.ndarray]:
    """Labels (``pool/<id>``, ``rejected/<id>``) and fingerprints of every reviewed image; each image is
    fingerprinted once, cached by content hash in ``folder/reviewed.npz``."""
    wanted = _reviewed_images(cfg)  # (label, sha256, image)
    path = folder / "reviewed.npz"
    known: dict[str, np.ndarray] = {}
    if path.is_file():
        with np.load(path) as cached:
            known = dict(zip(cached["keys"].tolist(), cached["fingerprints"], strict=True))
    missing = list({sha: image for _, sha, image in wanted if sha not in known}.items())
    if missing:
        log.info("fingerprinting %d reviewed image(s) not seen before", len(missing))
        for (sha, _), vector in zip(missing, embedder.fingerprint([image for _, image in missing]), strict=True):
            known[sha] = vector.astype(np.float16)  # as cached: half the disk, cosines move < 1e-3
        keys = sorted(known)
        _save_npz(path, keys=np.array(keys), fingerprints=np.stack([known[k] for k in keys]))
    if not wanted:
        return [], np.zeros((0, 0), dtype=np.float32)
    return [label for label, _, _ in wanted], np.stack([known[sha] for _, sha, _ in wanted]).astype(np.float32)


def _reviewed_images(cfg: DictConfig) -> list[tuple[str, str, Path]]:
    pool, inbox = resolve_path(cfg, "pool"), resolve_path(cfg, "inbox")
    wanted = []
    for kind, rows, images in (
        ("pool", read_manifest(pool / MANIFEST), pool / "images"),
        ("rejected", read_manifest(inbox / REJECTED_MANIFEST), inbox / REJECTED_DIR),
    ):
        for row in rows:
            image = find_image(images, row["id"])
            if image is None:
                log.warning("%s/%s: no image in %s; left out of the near-duplicate check", kind, row["id"], images)
                continue
            wanted.append((f"{kind}/{row['id']}", row["sha256"], image))
    return wanted


def _save_npz(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}.npz")
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- the saved order


def listing(cfg: DictConfig) -> tuple[list[dict], list[str]]:
    """The waiting inbox in the last saved queue's order: ``(rows, unranked ids)``. Each row is the
    saved item (rank, score, reason ...) or ``{id}`` alone for a report the saved queue did not rank
    (added since; listed last, in arrival order)."""
    waiting = [row["id"] for row in read_manifest(resolve_path(cfg, "inbox") / MANIFEST)]
    path = queue_path(cfg)
    saved = json.loads(path.read_text(encoding="utf-8"))["items"] if path.is_file() else []
    by_id = {item["id"]: item for item in saved}
    ids, unranked = ordering.saved_order([item["id"] for item in saved], waiting)
    return [by_id.get(i, {"id": i}) for i in ids], unranked


# --------------------------------------------------------------------------- the App


def show_in_app(dataset, queue: dict):
    """Store each report's queue rank, score, reason and near-duplicate source as sample fields
    (``queue_rank`` ...) of the review dataset and save the view ``by-value`` sorted by rank;
    returns that view. Reports the queue did not rank (none, normally) sort last."""
    import fiftyone as fo

    items = {item["id"]: item for item in queue["items"]}
    ids = dataset.values("detloop_id")
    unranked = len(items) + 1
    values = {
        FIELDS["rank"]: [items.get(i, {}).get("rank", unranked) for i in ids],
        FIELDS["score"]: [items.get(i, {}).get("score") for i in ids],
        FIELDS["reason"]: [items.get(i, {}).get("reason", "not ranked: run detloop review queue") for i in ids],
        FIELDS["duplicate"]: [(items.get(i, {}).get("duplicate_of") or {}).get("id") for i in ids],
    }
    kinds = {"rank": fo.IntField, "score": fo.FloatField, "reason": fo.StringField, "duplicate": fo.StringField}
    for key, field in FIELDS.items():
        if not dataset.has_sample_field(field):  # declared: a column of None (no duplicates) has no type to infer
            dataset.add_sample_field(field, kinds[key])
    for field, column in values.items():
        dataset.set_values(field, column)
    view = dataset.sort_by(FIELDS["rank"])
    dataset.save_view(
        SAVED_VIEW,
        view,
        description="the inbox in review-queue order: what would teach the model most first (detloop review queue)",
        overwrite=True,
    )
    return dataset.load_saved_view(SAVED_VIEW)


def saved_view(dataset):
    """The review dataset's saved view ``by-value`` when :func:`show_in_app` made one, else the dataset."""
    return dataset.load_saved_view(SAVED_VIEW) if dataset.has_saved_view(SAVED_VIEW) else dataset
