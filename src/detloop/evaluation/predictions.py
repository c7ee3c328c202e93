"""A model's predictions on a set, computed once: the same weights, images and settings are not predicted twice.

The ``evaluate`` stage measures the base on the anchor test split; the gate then measures the production
model (often that same base) on the same split, and every recipe-search trial measures the same reference
again. :func:`cached_predict` keys one prediction pass by everything its output depends on: the weights'
bytes, each image's path and bytes (in order), the prediction settings, the Ultralytics and torch versions
and the device (GPU name, or the CPU and its core count). A hit returns the stored arrays, identical to what the pass
gave; anything else predicts and stores. Entries are ``.npz`` files under ``build/cache/predictions``,
written atomically; an unreadable entry is predicted again; the newest ``evaluate.cache.keep`` are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from detloop.core.config import resolve_path
from detloop.core.env import gpu_possible, package_version
from detloop.data.manifest import sha256_file
from detloop.evaluation import evaluator
from detloop.evaluation.evaluator import Detections

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the stored layout changes


def device_key(device: str | int | None) -> str:
    """What decides the numbers besides weights and images: the device (GPU name) and the CPU count."""
    if str(device) == "cpu" or (device in (None, "") and not gpu_possible()):
        return f"cpu|cpus={os.cpu_count()}"
    import torch

    if device in (None, "") and torch.cuda.is_available():
        device = f"cuda:{torch.cuda.get_device_name(0)}"
    elif str(device).replace("cuda:", "").split(",")[0].isdigit() and torch.cuda.is_available():
        index = int(str(device).replace("cuda:", "").split(",")[0])
        device = f"cuda:{torch.cuda.get_device_name(index)}:{device}"
    else:
        device = str(device or "cpu")
    # on the CPU Ultralytics sets torch's threads from the CPU count for every pass (select_device)
    return f"{device}|cpus={os.cpu_count()}"


def cache_key(weights: str | Path, images: list[Path], settings: dict) -> str:
    record = {
        "format": FORMAT,
        "weights": sha256_file(weights),
        "images": [[str(Path(p).absolute()), sha256_file(p)] for p in images],
        "settings": {k: settings[k] for k in sorted(settings) if k != "device"},
        "device": device_key(settings.get("device")),
        "ultralytics": package_version("ultralytics"),
        "torch": package_version("torch"),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def save(path: Path, dets: list[Detections]) -> None:
    """Store ``dets`` at ``path`` atomically (a reader sees the old entry, none, or the whole new one)."""
    counts = np.array([len(d.cls) for d in dets], dtype=np.int64)
    arrays = {
        "counts": counts,
        "boxes": np.concatenate([d.boxes for d in dets]) if dets else np.zeros((0, 4)),
        "cls": np.concatenate([d.cls for d in dets]) if dets else np.zeros(0, dtype=np.int64),
        "conf": np.concatenate([d.conf for d in dets]) if dets else np.zeros(0),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path, n_images: int) -> list[Detections] | None:
    """The stored detections, or None when the entry is unreadable or not for ``n_images`` images."""
    try:
        with np.load(path) as data:
            counts, boxes, cls, conf = data["counts"], data["boxes"], data["cls"], data["conf"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        log.warning("prediction cache entry %s is unreadable (%s): predicting again", path, err)
        return None
    if len(counts) != n_images or int(counts.sum()) != len(cls):
        log.warning("prediction cache entry %s does not match its key: predicting again", path)
        return None
    edges = np.concatenate([[0], np.cumsum(counts)])
    return [Detections(boxes[a:b], cls[a:b], conf[a:b]) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def prune(folder: Path, keep: int) -> None:
    """Keep the ``keep`` most recently used entries."""
    entries = sorted(folder.glob("*.npz"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for stale in entries[max(keep, 0) :]:
        stale.unlink(missing_ok=True)


def cache_settings(cfg) -> tuple[Path | None, int]:
    """The cache folder (``build/cache/predictions``; None when off) and the entries kept (``evaluate.cache``)."""
    keep = int(cfg.evaluate.get("cache", {}).get("keep", 0))
    return (resolve_path(cfg, "build") / "cache" / "predictions" if keep > 0 else None), keep


def cached_predict(folder: Path | None, weights: str | Path, images: list[Path], keep: int = 64, **settings):
    """:func:`detloop.evaluation.evaluator.predict` with its result kept in ``folder`` (None: no cache).

    Returns ``(detections, hit)``.
    """
    images = [Path(p) for p in images]
    if folder is None or keep <= 0:
        return evaluator.predict(weights, images, **settings), False
    try:
        key = cache_key(weights, images, settings)
    except OSError:  # a missing or unreadable file: the prediction pass names it (BadInput)
        return evaluator.predict(weights, images, **settings), False
    path = folder / f"{key}.npz"
    if path.is_file():
        found = load(path, len(images))
        if found is not None:
            os.utime(path)  # recently used: kept by prune
            return found, True
    dets = evaluator.predict(weights, images, **settings)
    save(path, dets)
    prune(folder, keep)
    return dets, False
