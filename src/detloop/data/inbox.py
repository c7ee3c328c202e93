"""``detloop inbox add PATH``: reported failures enter the inbox, each one checked and content-hashed.

The inbox holds reports awaiting human review; nothing in it is ever trained on (``detloop review``
moves verified samples to the pool). A report is refused, with its reason, when its image or its
proposed labels are invalid, when the same bytes are already in the inbox, the pool, the rejected
reports or earlier in the same batch (a duplicate report), or when it is identical to an anchor
test image (test leakage). What is accepted is kept even when other files of the batch are refused.

Inbox layout (see docs/architecture: data layout)::

    images/<id><suffix>     copied bytes; id = report-<first 12 hex of the image's sha256>
    labels/<id>.txt         proposed labels, when the report came with them
    manifest.jsonl          id, sha256, source, reported_at, has_labels[, note]
    rejected.jsonl          review records of rejected reports (written by detloop review)
    rejected/               the files of rejected reports (nothing is silently lost)

Every file is written under a temporary name and renamed; manifest rows are appended last, so a
crash never leaves a row without its file. Writers of the inbox (add, review) hold a lock on it.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from detloop.core.config import resolve_path
from detloop.core.errors import BadInput
from detloop.data.manifest import MANIFEST, append_manifest, copy_atomic, fsync_file, read_manifest, sha256_file
from detloop.data.store import REJECTED_MANIFEST, fsync_dir, locked, record_data_version, utc_now
from detloop.data.yolo_format import (
    check_image,
    check_label_file,
    inspect_data_yaml,
    is_image_name,
    label_path_for,
    list_split_images,
)

log = logging.getLogger(__name__)

ID_PREFIX = "report-"
ID_HEX = 12  # hex digits of the image sha256 in a report id


@dataclass(frozen=True)
class Report:
    """One image of the batch being added: where it is, its content hash and its proposed labels."""

    path: Path
    sha256: str
    label: Path | None

    @property
    def id(self) -> str:
        return report_id(self.sha256)


@dataclass(frozen=True)
class KnownContent:
    """What the data folder already holds, by content hash (sha256 -> id or row)."""

    inbox: dict[str, str]
    pool: dict[str, str]
    rejected: dict[str, dict]
    anchor_test: dict[str, str]
    anchor_other: dict[str, str]
    ids: dict[str, str]  # every inbox / pool / rejected id -> its sha256


def report_id(sha256: str) -> str:
    """The id of a report: ``report-`` and the first 12 hex digits of its image's sha256."""
    return f"{ID_PREFIX}{sha256[:ID_HEX]}"


# --------------------------------------------------------------------------- public entry


def add_to_inbox(source: Path, cfg: DictConfig, labels: Path | None = None, note: str | None = None) -> dict:
    """Add the reported failure images at ``source`` (a folder, searched recursively, an image, or a
    ``.txt`` list of image paths) to the inbox, with proposed labels when there are any.

    Proposed labels are read from ``labels/<stem>.txt`` when ``labels`` is given, else from beside
    each image by the Ultralytics rule (``label_path_for``). Raises BadInput (nothing written) when
    the source or the labels folder does not exist or holds no images. Returns
    ``{accepted: [ids], refused: [{path, reason}], counts: {...}, inbox, data_version}``.
    """
    source = _absolute(source)
    labels = _absolute(labels) if labels is not None else None
    images, refused = list_reports(source, labels)
    num_classes = anchor_num_classes(cfg)
    inbox = resolve_path(cfg, "inbox")
    with locked(inbox):
        reports, screened = screen_reports(images, known_content(cfg), labels, num_classes, cfg.inbox)
        refused += screened
        rows, failed = write_reports(reports, inbox, note)
        refused += failed
        data_version = record_data_version(cfg) if rows else None
    result = {
        "accepted": [row["id"] for row in rows],
        "refused": refused,
        "inbox": str(inbox),
        "counts": {
            "accepted": len(rows),
            "refused": len(refused),
            "with_labels": sum(bool(row["has_labels"]) for row in rows),
            "inbox_size": len(read_manifest(inbox / MANIFEST)),
        },
        "data_version": data_version,
    }
    log.info("inbox add from %s: %d accepted, %d refused", source, len(rows), len(refused))
    return result


def _absolute(path: Path | str) -> Path:
    return Path(os.path.abspath(Path(path).expanduser()))


# --------------------------------------------------------------------------- the source


def list_reports(source: Path, labels: Path | None) -> tuple[list[Path], list[dict]]:
    """The images of ``source`` and refusals for its unusable entries; BadInput when there is nothing to add."""
    if labels is not None and not labels.is_dir():
        raise BadInput(f"{labels}: the labels folder does not exist; nothing was written")
    if not source.exists():
        raise BadInput(
            f"{source}: does not exist; nothing was written",
            ["give a folder of images, an image file or a .txt list of image paths"],
        )
    if source.is_file() and is_image_name(source):
        return [source], []
    if source.is_file() and source.suffix.lower() != ".txt":
        raise BadInput(f"{source}: not a folder, an image or a .txt list of images; nothing was written")
    images, problems = list_split_images(source)
    if not images:
        raise BadInput(f"{source}: no images to add; nothing was written", problems)
    if labels is not None:
        _warn_unmatched_labels(images, labels)
    return images, [refusal(problem) for problem in problems]


def refusal(problem: str) -> dict:
    """A ``path: what`` problem of yolo_format as a refusal ``{path, reason}``."""
    path, _, reason = problem.partition(": ")
    return {"path": path, "reason": reason or problem}


def _warn_unmatched_labels(images: list[Path], labels: Path) -> None:
    stems = {image.stem for image in images}
    unmatched = sorted(p.name for p in labels.glob("*.txt") if p.stem not in stems)
    if unmatched:
        log.warning(
            "%d label file(s) in %s match no image and are ignored: %s",
            len(unmatched),
            labels,
            ", ".join(unmatched[:10]),
        )


def proposed_label(image: Path, labels: Path | None) -> Path | None:
    """The proposed label file of an image: ``labels/<stem>.txt``, else beside it (Ultralytics rule)."""
    path = labels / f"{image.stem}.txt" if labels is not None else label_path_for(image)
    return path if path.is_file() else None


# --------------------------------------------------------------------------- what is known


def anchor_num_classes(cfg: DictConfig) -> int:
    """The class count of the anchor's data.yaml: labels of reports are checked against it."""
    spec, problems = inspect_data_yaml(resolve_path(cfg, "anchor") / "data.yaml")
    if spec is None:
        raise BadInput(
            "the anchor dataset is missing or unusable (import it first: detloop anchor import PATH); "
            "nothing was written",
            problems,
        )
    return spec.num_classes


def known_content(cfg: DictConfig) -> KnownContent:
    """Content hashes of the inbox, the pool, the rejected reports and the anchor (by split)."""
    inbox, pool, anchor = (resolve_path(cfg, key) for key in ("inbox", "pool", "anchor"))
    if not (anchor / MANIFEST).is_file():
        raise BadInput(
            f"{anchor / MANIFEST}: no anchor manifest, so test leakage cannot be checked; nothing was written"
        )
    inbox_rows, pool_rows = read_manifest(inbox / MANIFEST), read_manifest(pool / MANIFEST)
    rejected_rows, anchor_rows = read_manifest(inbox / REJECTED_MANIFEST), read_manifest(anchor / MANIFEST)
    return KnownContent(
        inbox=_by_sha(inbox_rows),
        pool=_by_sha(pool_rows),
        rejected={row["sha256"]: row for row in rejected_rows},
        anchor_test=_by_sha(row for row in anchor_rows if row.get("split") == "test"),
        anchor_other=_by_sha(row for row in anchor_rows if row.get("split") != "test"),
        ids={row["id"]: row["sha256"] for row in [*inbox_rows, *pool_rows, *rejected_rows]},
    )


def _by_sha(rows: Iterable[Mapping]) -> dict[str, str]:
    return {row["sha256"]: row["id"] for row in rows}


# --------------------------------------------------------------------------- screening


def screen_reports(
    images: list[Path], known: KnownContent, labels: Path | None, num_classes: int, inbox_cfg: DictConfig
) -> tuple[list[Report], list[dict]]:
    """Check every image; return the reports to accept and the refusals (one per refused file)."""
    accepted: list[Report] = []
    refused: list[dict] = []
    first_seen: dict[str, Path] = {}
    stems = Counter(image.stem for image in images) if labels is not None else Counter()
    for image in _progress(images, "checking reports"):
        try:
            report = Report(image, sha256_file(image), proposed_label(image, labels))
        except OSError as err:
            refused.append({"path": str(image), "reason": f"cannot be read ({err.strerror or err})"})
            continue
        reasons = duplicate_reasons(report, known, first_seen)
        reasons += image_reasons(image, int(inbox_cfg.min_side), inbox_cfg.max_pixels)
        reasons += label_reasons(report, num_classes, stems)
        first_seen.setdefault(report.sha256, image)
        if reasons:
            refused.append({"path": str(image), "reason": "; ".join(reasons)})
        else:
            _warn_anchor_copy(report, known)
            accepted.append(report)
    return accepted, refused


def duplicate_reasons(report: Report, known: KnownContent, first_seen: Mapping[str, Path]) -> list[str]:
    """Why a report duplicates something: anchor test (leakage), inbox, pool, rejected, this batch."""
    sha = report.sha256
    reasons = []
    if sha in known.anchor_test:
        reasons.append(
            f"identical to anchor test image {known.anchor_test[sha]} "
            "(test leakage: the anchor test set must stay unseen)"
        )
    if sha in known.inbox:
        reasons.append(f"duplicate of inbox sample {known.inbox[sha]} (already reported, awaiting review)")
    if sha in known.pool:
        reasons.append(f"duplicate of pool sample {known.pool[sha]} (already verified)")
    if sha in known.rejected:
        row = known.rejected[sha]
        reasons.append(
            f"duplicate of {row['id']}, rejected by {row.get('reviewer')} at {row.get('reviewed_at')}"
            f" ({row.get('reason') or 'no reason given'})"
        )
    if sha in first_seen:
        reasons.append(f"duplicate of {first_seen[sha]} in this batch")
    if not reasons and known.ids.get(report.id, sha) != sha:
        reasons.append(f"id {report.id} is taken by another image (sha256 prefix collision)")
    return reasons


def image_reasons(image: Path, min_side: int, max_pixels: int | None) -> list[str]:
    """Problems of the image file (decodes, not truncated, format, size), without the path prefix."""
    problems = check_image(image, max_pixels)
    if not problems and min_side:
        from PIL import Image

        with Image.open(image) as im:  # reads the header only
            width, height = im.size
        if min(width, height) < min_side:
            problems.append(f"{image}: image is {width}x{height} px, smaller than inbox.min_side={min_side} px")
    return [refusal(problem)["reason"] for problem in problems]


def label_reasons(report: Report, num_classes: int, stems: Mapping[str, int]) -> list[str]:
    """Problems of the proposed labels, each naming ``file:line``."""
    if stems.get(report.path.stem, 0) > 1:
        return [
            f"{stems[report.path.stem]} images of this batch are named {report.path.stem}.*, "
            "so labels matched by stem are ambiguous"
        ]
    if report.label is None:
        return []
    return [f"bad proposed labels: {problem}" for problem in check_label_file(report.label, num_classes)]


def _warn_anchor_copy(report: Report, known: KnownContent) -> None:
    if report.sha256 in known.anchor_other:
        log.warning(
            "%s is identical to anchor image %s (the model was trained on it); accepted",
            report.path,
            known.anchor_other[report.sha256],
        )


def _progress(items: list, desc: str) -> Iterable:
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="img", disable=None, leave=False)


# --------------------------------------------------------------------------- writing


def write_reports(reports: list[Report], inbox: Path, note: str | None) -> tuple[list[dict], list[dict]]:
    """Copy each report's files into the inbox, then append their manifest rows in one go."""
    rows: list[dict] = []
    failed: list[dict] = []
    for report in _progress(reports, "adding to inbox"):
        try:
            write_report_files(report, inbox)
        except ValueError as err:  # the source changed after it was checked
            failed.append({"path": str(report.path), "reason": str(err)})
            continue
        rows.append(inbox_row(report, note))
    if rows:
        for folder in ("images", "labels"):
            fsync_dir(inbox / folder)
        append_manifest(inbox / MANIFEST, rows)
        fsync_file(inbox / MANIFEST)
    return rows, failed


def write_report_files(report: Report, inbox: Path) -> None:
    """``images/<id><suffix>`` and, with proposed labels, ``labels/<id>.txt`` (a stale one is removed)."""
    copy_atomic(report.path, inbox / "images" / f"{report.id}{report.path.suffix.lower()}", report.sha256)
    label = inbox / "labels" / f"{report.id}.txt"
    if report.label is not None:
        copy_atomic(report.label, label)
    else:
        label.unlink(missing_ok=True)  # left by an interrupted earlier add of the same image


def inbox_row(report: Report, note: str | None) -> dict:
    row = {
        "id": report.id,
        "sha256": report.sha256,
        "source": str(report.path),
        "reported_at": utc_now(),
        "has_labels": report.label is not None,
    }
    if note:
        row["note"] = note
    return row
