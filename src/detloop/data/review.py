"""``detloop review accept|reject ID...``: the file-based human review that moves reports to the pool.

Only inbox samples with a review record ever enter the pool. ``accept`` copies a sample with its
labels (corrected ones from ``--labels DIR/<id>.txt``, else the proposed inbox labels; a sample
with neither is refused) into the append-only pool, recording reviewer, time and the sample's
fixed split; ``reject`` records the decision in ``inbox/rejected.jsonl`` and moves the files to
``inbox/rejected/``. Everything is validated before anything is written (BadInput, nothing changed).

Write order, so that a crash never loses a sample: destination files, destination record, the
inbox manifest without the samples (temp file + rename), and only then the inbox files.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from detloop.core.config import resolve_path
from detloop.core.errors import BadInput
from detloop.data.inbox import anchor_num_classes
from detloop.data.manifest import (
    MANIFEST,
    append_manifest,
    copy_atomic,
    fsync_file,
    manifest_line,
    read_manifest,
    sha256_file,
    split_for,
)
from detloop.data.store import (
    REJECTED_DIR,
    REJECTED_MANIFEST,
    find_image,
    fsync_dir,
    locked,
    record_data_version,
    utc_now,
)
from detloop.data.yolo_format import check_label_file

log = logging.getLogger(__name__)

DECISIONS = ("accept", "reject")


@dataclass(frozen=True)
class ReviewItem:
    """One inbox sample under review: its inbox row, image and the labels it would carry."""

    row: dict
    image: Path
    label: Path | None  # accept: the labels that go to the pool; reject: the proposed labels, if any
    corrected: bool = False  # the label came from the reviewer's labels folder

    @property
    def id(self) -> str:
        return self.row["id"]


@dataclass(frozen=True)
class ReviewState:
    """The manifests a review is checked against, read once under the inbox lock."""

    inbox: dict[str, dict]
    pool: dict[str, dict]
    pool_shas: dict[str, str]
    rejected: dict[str, dict]


def inbox_ids(cfg: DictConfig) -> list[str]:
    """Every sample id waiting in the inbox, in manifest order (``--all``)."""
    return [row["id"] for row in read_manifest(resolve_path(cfg, "inbox") / MANIFEST)]


def review(
    cfg: DictConfig,
    decision: str,
    ids: list[str],
    reviewer: str,
    labels_dir: Path | None = None,
    reason: str | None = None,
) -> dict:
    """Accept inbox samples into the pool or reject them, recording who decided and when.

    Raises BadInput listing every problem (unknown or already-reviewed ids, missing reviewer, missing
    or bad labels) before anything is written. Returns ``{decision, ids, reviewer, pool_size,
    inbox_size, data_version}``.
    """
    inbox = resolve_path(cfg, "inbox")
    if decision == "reject" and labels_dir is not None:
        log.warning("--labels is ignored when rejecting")
    with locked(inbox):
        items = plan_review(cfg, decision, ids, reviewer, labels_dir)
        if decision == "accept":
            accept_into_pool(cfg, items, reviewer.strip())
        else:
            reject_from_inbox(inbox, items, reviewer.strip(), reason)
        data_version = record_data_version(cfg)
    result = {
        "decision": decision,
        "ids": [item.id for item in items],
        "reviewer": reviewer.strip(),
        "pool_size": len(read_manifest(resolve_path(cfg, "pool") / MANIFEST)),
        "inbox_size": len(read_manifest(inbox / MANIFEST)),
        "data_version": data_version,
    }
    log.info(
        "review %s by %s: %d sample(s) %s",
        decision,
        result["reviewer"],
        len(items),
        "moved to the pool" if decision == "accept" else "rejected",
    )
    return result


# --------------------------------------------------------------------------- validation


def plan_review(
    cfg: DictConfig, decision: str, ids: list[str], reviewer: str | None, labels_dir: Path | None
) -> list[ReviewItem]:
    """Check the whole review request; return its items or raise BadInput with every problem."""
    problems = _request_problems(decision, ids, reviewer, labels_dir)
    state = read_state(cfg)
    accepting = decision == "accept"
    labels_dir = labels_dir if labels_dir is not None and Path(labels_dir).is_dir() else None
    num_classes = anchor_num_classes(cfg) if accepting else 0
    items = []
    for sample_id in dict.fromkeys(ids):  # a repeated id is one sample
        item, item_problems = plan_item(cfg, state, sample_id, labels_dir if accepting else None, accepting)
        problems += item_problems
        if item is None:
            continue
        if accepting and item.label is not None:
            problems += check_label_file(item.label, num_classes)
        items.append(item)
    if problems:
        raise _refused(problems)
    return items


def _refused(problems: list[str]) -> BadInput:
    return BadInput(f"review refused, {len(problems)} problem(s); nothing was changed", problems)


def _request_problems(decision: str, ids: list[str], reviewer: str | None, labels_dir: Path | None) -> list[str]:
    problems = []
    if decision not in DECISIONS:
        problems.append(f"decision {decision!r}: expected one of {', '.join(DECISIONS)}")
    if not (reviewer or "").strip():
        problems.append("--reviewer: required (who verified these samples); reviews are recorded by name")
    if not ids:
        problems.append("no sample ids given (name inbox ids, or --all for every inbox sample)")
    if labels_dir is not None and not Path(labels_dir).is_dir():
        problems.append(f"--labels {labels_dir}: the corrected-labels folder does not exist")
    return problems


def read_state(cfg: DictConfig) -> ReviewState:
    inbox, pool = resolve_path(cfg, "inbox"), resolve_path(cfg, "pool")
    pool_rows = read_manifest(pool / MANIFEST)
    return ReviewState(
        inbox={row["id"]: row for row in read_manifest(inbox / MANIFEST)},
        pool={row["id"]: row for row in pool_rows},
        pool_shas={row["sha256"]: row["id"] for row in pool_rows},
        rejected={row["id"]: row for row in read_manifest(inbox / REJECTED_MANIFEST)},
    )


def plan_item(
    cfg: DictConfig, state: ReviewState, sample_id: str, labels_dir: Path | None, accepting: bool
) -> tuple[ReviewItem | None, list[str]]:
    """One sample: it must wait in the inbox with its image intact (and, to accept, have labels)."""
    if sample_id in state.pool:
        return None, [f"{sample_id}: already in the pool (the pool is append-only; it is never reviewed again)"]
    row = state.inbox.get(sample_id)
    if row is None:
        if sample_id in state.rejected:
            return None, [f"{sample_id}: already rejected by {state.rejected[sample_id].get('reviewer')}"]
        return None, [f"{sample_id}: not in the inbox ({resolve_path(cfg, 'inbox') / MANIFEST})"]
    inbox = resolve_path(cfg, "inbox")
    image = find_image(inbox / "images", sample_id)
    problems = _image_problems(sample_id, image, row, state)
    label, corrected = _review_label(inbox, row, labels_dir)
    if accepting and label is None:
        where = f"neither {Path(labels_dir) / (sample_id + '.txt')} nor" if labels_dir is not None else "no"
        problems.append(f"{sample_id}: {where} proposed labels in the inbox; unlabelled samples never enter the pool")
    if accepting and image is not None:
        problems += _pool_clash(resolve_path(cfg, "pool"), sample_id, image, row["sha256"])
    return ReviewItem(row, image, label, corrected) if image is not None else None, problems


def _image_problems(sample_id: str, image: Path | None, row: dict, state: ReviewState) -> list[str]:
    if image is None:
        return [f"{sample_id}: its image is missing from the inbox images folder"]
    if sha256_file(image) != row["sha256"]:
        return [f"{image}: content differs from the inbox manifest (sha256 {row['sha256'][:12]}...)"]
    if row["sha256"] in state.pool_shas:
        return [f"{sample_id}: identical to pool sample {state.pool_shas[row['sha256']]}"]
    return []


def _review_label(inbox: Path, row: dict, labels_dir: Path | None) -> tuple[Path | None, bool]:
    """Corrected labels from the reviewer's folder, else the proposed ones; (None, False) when neither."""
    if labels_dir is not None and (corrected := Path(labels_dir) / f"{row['id']}.txt").is_file():
        return corrected, True
    proposed = inbox / "labels" / f"{row['id']}.txt"
    if row.get("has_labels", True) and proposed.is_file():
        return proposed, False
    return None, False


def _pool_clash(pool: Path, sample_id: str, image: Path, sha256: str) -> list[str]:
    """A pool file of this id without a manifest row is only acceptable if it holds the same bytes."""
    target = pool / "images" / f"{sample_id}{image.suffix}"
    if target.exists() and sha256_file(target) != sha256:
        return [f"{target}: exists with other content (the pool is append-only; it is never overwritten)"]
    return []


# --------------------------------------------------------------------------- writing


def accept_into_pool(cfg: DictConfig, items: list[ReviewItem], reviewer: str) -> None:
    """Copy the samples into the pool, append their rows, then remove them from the inbox."""
    pool, inbox = resolve_path(cfg, "pool"), resolve_path(cfg, "inbox")
    fractions = dict(cfg.pool.split)
    rows = []
    for item in items:
        copy_atomic(item.image, pool / "images" / f"{item.id}{item.image.suffix}", item.row["sha256"])
        labels_sha256 = copy_atomic(item.label, pool / "labels" / f"{item.id}.txt")
        rows.append(pool_row(item, reviewer, split_for(item.id, fractions), labels_sha256))
    for folder in ("images", "labels"):
        fsync_dir(pool / folder)
    append_manifest(pool / MANIFEST, rows)
    fsync_file(pool / MANIFEST)
    remove_from_inbox(inbox, items, move_to=None)


def pool_row(item: ReviewItem, reviewer: str, split: str, labels_sha256: str) -> dict:
    """The pool manifest row of an accepted sample (its split is fixed here, once)."""
    row = {key: item.row[key] for key in ("id", "sha256", "source", "reported_at") if key in item.row}
    row.update(
        {
            "reviewer": reviewer,
            "verified_at": utc_now(),
            "decision": "accept",
            "split": split,
            "labels_sha256": labels_sha256,
            "labels_from": "corrected" if item.corrected else "proposed",
        }
    )
    if item.row.get("note"):
        row["note"] = item.row["note"]
    return row


def reject_from_inbox(inbox: Path, items: list[ReviewItem], reviewer: str, reason: str | None) -> None:
    """Record the rejections, then move the samples' files to ``inbox/rejected/``."""
    now = utc_now()
    records = [
        {
            "id": item.id,
            "sha256": item.row["sha256"],
            "source": item.row.get("source"),
            "reported_at": item.row.get("reported_at"),
            "reviewer": reviewer,
            "reviewed_at": now,
            "decision": "reject",
            "reason": reason,
        }
        for item in items
    ]
    append_manifest(inbox / REJECTED_MANIFEST, records)
    fsync_file(inbox / REJECTED_MANIFEST)
    remove_from_inbox(inbox, items, move_to=inbox / REJECTED_DIR)


def remove_from_inbox(inbox: Path, items: list[ReviewItem], move_to: Path | None) -> None:
    """Rewrite the inbox manifest without the items, then delete (or move) their files."""
    gone = {item.id for item in items}
    keep = [row for row in read_manifest(inbox / MANIFEST) if row["id"] not in gone]
    replace_text(inbox / MANIFEST, "".join(manifest_line(row) for row in keep))
    for item in items:
        files = [item.image, inbox / "labels" / f"{item.id}.txt"]
        for path in (p for p in files if p.is_file()):
            if move_to is None:
                path.unlink()
            else:
                move_to.mkdir(parents=True, exist_ok=True)
                os.replace(path, move_to / path.name)


def replace_text(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file and an atomic rename."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


# --------------------------------------------------------------------------- data version
