"""``detloop abset``: labelled production samples for Gate 3, the optional A/B comparison (document section 4).

1. ``detloop abset build [--size N]`` draws ``serve.abset.size`` (default ``gate.ab.size``, 100) images the
   server scored from the prediction log, with seed ``serve.abset.seed``, and writes them with the
   served prediction as proposed labels into ``serve.abset.inbox``, in the inbox layout::

       images/prod-<sha12><suffix>   the kept production image (serve.images)
       labels/prod-<sha12>.txt       the served detections as YOLO labels (none when nothing was detected)
       manifest.jsonl                id, sha256, source (the kept file), reported_at (when it was served),
                                     has_labels, model_version, predlog_id

   Drawn are distinct images (by content) that the server answered with 200, whose kept file still
   holds the logged bytes, that are not in the A/B set yet (pending, verified or rejected) and not in
   the anchor, the pool or the inbox: an image the candidate was trained on would favour it.
2. ``detloop abset review accept|reject ID... --reviewer NAME [--labels DIR]`` is ``detloop review``
   pointed at the A/B folders: accepted samples, with corrected labels from ``DIR/<id>.txt`` or the
   proposed ones, move to ``serve.abset.verified`` (``images/`` + ``labels/`` + a manifest with reviewer
   and time); rejected ones are recorded in ``rejected.jsonl`` beside the pending ones.
3. The gate reads it: ``gate.ab.data=<serve.abset.verified>`` (``python -m detloop.gate`` or ``conf/gate``);
   ``detloop.gate.ab_sample`` draws ``gate.ab.size`` labelled images from it.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from omegaconf import DictConfig

from detloop.core.errors import BadInput
from detloop.data.inbox import KnownContent, known_content
from detloop.data.manifest import MANIFEST, append_manifest, copy_atomic, fsync_file, read_manifest, sha256_file
from detloop.data.store import fsync_dir, locked, utc_now
from detloop.production import predlog

log = logging.getLogger(__name__)

ID_PREFIX = "prod-"
REJECTED = "rejected.jsonl"
DAY = 86400.0


def folders(cfg: DictConfig) -> tuple[Path, Path]:
    """(pending, verified): ``serve.abset.inbox`` and ``serve.abset.verified`` as absolute paths."""
    from detloop.core.env import in_project

    return in_project(cfg.serve.abset.inbox), in_project(cfg.serve.abset.verified)


def review_overrides(cfg: DictConfig) -> list[str]:
    """Overrides that point ``detloop review`` at the A/B folders (pending -> verified)."""
    pending, verified = folders(cfg)
    return [f"paths.inbox={pending}", f"paths.pool={verified}"]


def sample_id(sha256: str) -> str:
    return f"{ID_PREFIX}{sha256[:12]}"


def taken(cfg: DictConfig, known: KnownContent) -> set[str]:
    """Content hashes that must not be drawn: the A/B set so far, anchor, pool and inbox."""
    pending, verified = folders(cfg)
    rows = [*read_manifest(pending / MANIFEST), *read_manifest(pending / REJECTED), *read_manifest(verified / MANIFEST)]
    return (
        {row["sha256"] for row in rows}
        | set(known.inbox)
        | set(known.pool)
        | set(known.rejected)
        | set(known.anchor_test)
        | set(known.anchor_other)
    )


def candidates(log_store: predlog.PredictionLog, since: float | None) -> list[tuple[str, int]]:
    """(sha256, first log row id) of every distinct kept image the server scored, by sha256."""
    c = predlog.predictions.c
    cond = sa.and_(c.endpoint == "invocations", c.status == 200, c.image_path.is_not(None))
    if since is not None:
        cond = sa.and_(cond, c.ts >= since)
    query = sa.select(c.image_sha256, sa.func.min(c.id)).where(cond).group_by(c.image_sha256).order_by(c.image_sha256)
    with log_store.engine.connect() as conn:
        return [(sha, int(first)) for sha, first in conn.execute(query)]


def rows_by_id(log_store: predlog.PredictionLog, ids: list[int]) -> dict[int, dict]:
    c = predlog.predictions.c
    with log_store.engine.connect() as conn:
        return {r.id: dict(r._mapping) for r in conn.execute(sa.select(predlog.predictions).where(c.id.in_(ids)))}


def label_lines(detections_json: str) -> list[str]:
    """The logged detections as YOLO label lines (``class xc yc w h``)."""
    lines = []
    for cls, _conf, xc, yc, w, h in predlog.parse_detections(detections_json):
        if w > 0 and h > 0:
            lines.append(f"{int(cls)} {xc:.6f} {yc:.6f} {w:.6f} {h:.6f}")
    return lines


def build(
    cfg: DictConfig,
    size: int | None = None,
    seed: int | None = None,
    days: float | None = None,
    log_store: predlog.PredictionLog | None = None,
) -> dict:
    """Draw production images for the A/B set into ``serve.abset.inbox`` (see the module docstring).

    Returns ``{added, drawn_from, skipped, pending, verified, inbox}``; BadInput (nothing written) when
    the log holds no image that can be drawn.
    """
    ab = cfg.serve.abset
    size = int(ab.size if size is None else size)
    seed = int(ab.seed if seed is None else seed)
    days = ab.days if days is None else days
    if size < 1:
        raise BadInput(f"--size {size}: draw at least one image (serve.abset.size)")
    pending, verified = folders(cfg)
    owned = log_store is None
    store = predlog.open_log(cfg) if owned else log_store
    try:
        since = None if days is None else time.time() - float(days) * DAY
        with locked(pending):
            exclude = taken(cfg, known_content(cfg))
            found = candidates(store, since)
            pool = [(sha, first) for sha, first in found if sha not in exclude]
            if not pool:
                where = predlog.shown_uri(store.uri)
                raise BadInput(
                    f"no production image to draw from the prediction log ({where})",
                    [
                        f"{len(found)} distinct scored images kept (serve.images.store), "
                        f"{len(found) - len(pool)} of them already in the A/B set, anchor, pool or inbox"
                    ],
                )
            order = np.random.default_rng(seed).permutation(len(pool))
            picked, skipped = _draw(store, [pool[i] for i in order], size)
            if not picked:
                raise BadInput(
                    f"no production image to draw: the {len(pool)} candidate(s) in the prediction log "
                    "have no intact kept file",
                    skipped,
                )
            rows = _write(pending, picked)
    finally:
        if owned:
            store.close()
    log.info("abset: %d production images drawn into %s (%d skipped)", len(rows), pending, len(skipped))
    return {
        "added": [r["id"] for r in rows],
        "drawn_from": len(pool),
        "skipped": skipped,
        "inbox": str(pending),
        "pending": len(read_manifest(pending / MANIFEST)),
        "verified": len(read_manifest(verified / MANIFEST)),
        "with_labels": sum(bool(r["has_labels"]) for r in rows),
    }


def _draw(store: predlog.PredictionLog, ordered: list[tuple[str, int]], size: int) -> tuple[list[dict], list[str]]:
    """The first ``size`` candidates (in draw order) whose kept image is intact; the others' reasons."""
    picked: list[dict] = []
    skipped: list[str] = []
    for start in range(0, len(ordered), max(size, 1)):
        if len(picked) >= size:
            break
        batch = ordered[start : start + size]
        rows = rows_by_id(store, [first for _, first in batch])
        for sha, first in batch:
            if len(picked) >= size:
                break
            row = rows[first]
            path = Path(row["image_path"])
            if not path.is_file():
                skipped.append(f"{path}: kept image of log row {first} is missing")
            elif sha256_file(path) != sha:
                skipped.append(f"{path}: content differs from log row {first} (sha256 {sha[:12]})")
            else:
                picked.append(row)
    return picked, skipped


def _write(pending: Path, picked: list[dict]) -> list[dict]:
    """Images and proposed labels first, then the manifest rows (a crash never leaves a row without files)."""
    rows = []
    for row in picked:
        sha, source = row["image_sha256"], Path(row["image_path"])
        sid = sample_id(sha)
        copy_atomic(source, pending / "images" / f"{sid}{source.suffix.lower()}", sha)
        lines = label_lines(row["detections"])
        label = pending / "labels" / f"{sid}.txt"
        if lines:
            label.parent.mkdir(parents=True, exist_ok=True)
            tmp = label.with_name(f".{label.name}.tmp-{uuid.uuid4().hex[:8]}")
            tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
            os.replace(tmp, label)
        else:
            label.unlink(missing_ok=True)
        rows.append(
            {
                "id": sid,
                "sha256": sha,
                "source": str(source),
                "reported_at": _iso(row["ts"]),
                "has_labels": bool(lines),
                "model_version": row["model_version"],
                "predlog_id": row["id"],
                "drawn_at": utc_now(),
            }
        )
    if rows:
        for folder in ("images", "labels"):
            fsync_dir(pending / folder)
        append_manifest(pending / MANIFEST, rows)
        fsync_file(pending / MANIFEST)
    return rows


def _iso(ts: float) -> str:
    from datetime import UTC, datetime

    from detloop.data.store import TIME_FORMAT

    return datetime.fromtimestamp(ts, UTC).strftime(TIME_FORMAT)


def format_build(result: dict, cfg: DictConfig) -> str:
    """``detloop abset build`` for the terminal: what was drawn and the next two commands."""
    _, verified = folders(cfg)
    lines = [
        f"A/B set: {len(result['added'])} production image(s) drawn from {result['drawn_from']} candidates "
        f"into {result['inbox']} ({result['with_labels']} with proposed labels); "
        f"{result['pending']} await review, {result['verified']} verified"
    ]
    lines += [f"skipped {s}" for s in result["skipped"][:20]]
    lines.append("review: detloop abset review accept ID... --reviewer NAME [--labels DIR]   (or --all)")
    lines.append(f"gate:   python -m detloop.gate gate.ab.data={verified}")
    return "\n".join(lines)
