"""``detloop anchor import PATH``: make a user's Ultralytics-format dataset the permanent anchor.

Everything is validated before anything is written; any problem raises :class:`BadInput` listing all
of them and leaves ``paths.anchor`` untouched. The new anchor is built in a hidden folder beside the
target and renamed into place, so a crash never leaves a half-written anchor.

Anchor layout written here (see docs/architecture: data layout)::

    data.yaml                       train/val/test: images/<split> ; names: {id: name} ; no path: key
    images/<split>/<file name>      copied bytes
    labels/<split>/<stem>.txt       copied bytes; an empty file for a background image
    manifest.jsonl                  id (<split>/<stem>), split, sha256, source; sorted by id

It also starts an empty pool and inbox (``paths.pool``, ``paths.inbox``: an empty ``manifest.jsonl``
each) where none exist, so that a first ``dvc add data`` + ``dvc repro`` finds every data folder the
pipeline reads (DVC tracks files, not empty folders) and the ``mix`` stage records "waiting: 0/50".
An existing pool or inbox is never touched.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from detloop.core.config import resolve_path
from detloop.core.errors import BadInput
from detloop.data.manifest import MANIFEST, copy_atomic, fsync_file, sha256_file, write_manifest
from detloop.data.store import fsync_dir
from detloop.data.yolo_format import (
    DEFAULT_MAX_PIXELS,
    SPLITS,
    DataSpec,
    check_image,
    find_data_yaml,
    inspect_data_yaml,
    label_path_for,
    list_split_images,
    orphan_labels,
    parse_label_file,
)

log = logging.getLogger(__name__)

MAX_PIXELS_KEY = "yolo_format.max_pixels"  # optional config key; PIL's default limit when unset


@dataclass(frozen=True)
class AnchorSample:
    """One validated image of the source dataset and what the anchor will hold for it."""

    split: str
    image: Path  # absolute source path
    label: Path | None  # source label file; None: background image without a label file
    sha256: str
    boxes: int

    @property
    def id(self) -> str:
        return f"{self.split}/{self.image.stem}"


@dataclass(frozen=True)
class AnchorPlan:
    """A fully validated source dataset, ready to be written as the anchor."""

    spec: DataSpec
    samples: list[AnchorSample]


def import_anchor(source: Path, cfg: DictConfig, replace: bool = False) -> dict:
    """Validate the dataset at ``source`` (a data.yaml or a folder holding one) and make it the anchor.

    Raises BadInput listing every problem (nothing written) when the data is invalid, or when an
    anchor already exists and ``replace`` is False. Returns a summary: target, source, names and
    per split the counts of images, labelled images, background images and boxes, and ``started``:
    the empty pool and inbox manifests written because there were none (see ``start_pool_and_inbox``).
    """
    target = resolve_path(cfg, "anchor")
    max_pixels = OmegaConf.select(cfg, MAX_PIXELS_KEY, default=DEFAULT_MAX_PIXELS)
    plan = plan_anchor(Path(source), target, replace=replace, max_pixels=max_pixels)
    write_anchor(plan, target)
    summary = summarize(plan, target)
    summary["started"] = [str(path) for path in start_pool_and_inbox(cfg)]
    log.info("anchor imported into %s: %s", target, _counts_text(summary["splits"]))
    return summary


def start_pool_and_inbox(cfg: DictConfig) -> list[Path]:
    """An empty ``manifest.jsonl`` in ``paths.pool`` and ``paths.inbox`` where there is none; the ones written.

    The pool stays append-only: an existing manifest (empty or not) is left as it is.
    """
    started = []
    for key in ("pool", "inbox"):
        manifest = resolve_path(cfg, key) / MANIFEST
        manifest.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(manifest, "xb"):  # exclusive create: never truncates a manifest written meanwhile
                pass
        except FileExistsError:
            continue
        fsync_file(manifest)
        fsync_dir(manifest.parent)
        started.append(manifest)
        log.info("started an empty %s: %s", key, manifest)
    return started


# --------------------------------------------------------------------------- validation


def plan_anchor(
    source: Path, target: Path, replace: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> AnchorPlan:
    """Validate the source dataset and the target; raise BadInput with every problem found."""
    problems = target_problems(target, replace)
    spec, yaml_problems = inspect_data_yaml(find_data_yaml(Path(os.path.abspath(source))))
    problems += yaml_problems
    if spec is None:
        raise _refused(source, problems)
    problems += _overlap_problems(spec, target)
    samples, sample_problems = collect_samples(spec, max_pixels)
    problems += sample_problems + duplicate_problems(samples)
    if problems:
        raise _refused(source, problems)
    return AnchorPlan(spec=spec, samples=samples)


def _refused(source: Path, problems: list[str]) -> BadInput:
    return BadInput(f"{source}: not imported as the anchor, {len(problems)} problem(s); nothing was written", problems)


def target_problems(target: Path, replace: bool) -> list[str]:
    """An existing, non-empty anchor is permanent: refuse it unless ``replace``."""
    if target.exists() and not target.is_dir():
        return [f"{target}: the anchor path exists and is not a folder"]
    if target.is_dir() and any(target.iterdir()) and not replace:
        return [
            f"{target}: an anchor already exists and the anchor is permanent; "
            "replace it explicitly (detloop anchor import PATH --replace)"
        ]
    return []


def _overlap_problems(spec: DataSpec, target: Path) -> list[str]:
    sources = [spec.yaml_path, *spec.splits.values()]
    inside = [p for p in sources if p.is_relative_to(target)]
    return [f"{p}: the source lies inside the anchor folder {target}; import from a copy" for p in inside]


def collect_samples(spec: DataSpec, max_pixels: int | None) -> tuple[list[AnchorSample], list[str]]:
    """Check every image and label of every split; return the valid samples and all problems."""
    images, problems = _split_images(spec)
    samples = []
    for split, image in _progress(images, "checking images"):
        sample, sample_problems = inspect_sample(split, image, spec.num_classes, max_pixels)
        problems += sample_problems
        samples.append(sample)
    label_roots = [label_path_for(src / "x.jpg").parent for src in spec.splits.values() if src.is_dir()]
    problems += orphan_labels([image for _, image in images], label_roots)
    return samples, problems


def _split_images(spec: DataSpec) -> tuple[list[tuple[str, Path]], list[str]]:
    """(split, image) pairs of all splits whose source exists (missing ones are yaml problems)."""
    pairs: list[tuple[str, Path]] = []
    problems: list[str] = []
    for split, source in spec.splits.items():
        if not source.exists():
            continue
        images, split_problems = list_split_images(source)
        problems += split_problems
        if not images:
            problems.append(f"{source}: split '{split}' has no images")
        pairs += [(split, image) for image in images]
    return pairs, problems


def inspect_sample(split: str, image: Path, num_classes: int, max_pixels: int | None) -> tuple[AnchorSample, list[str]]:
    """Check one image and its label file (a missing label file is a background image).

    The sample is returned even when it has problems, so that duplicates are found among all images.
    """
    problems = check_image(image, max_pixels)
    label = label_path_for(image)
    boxes, label_problems = parse_label_file(label, num_classes) if label.is_file() else ([], [])
    sample = AnchorSample(
        split=split, image=image, label=label if label.is_file() else None, sha256=sha256_file(image), boxes=len(boxes)
    )
    return sample, problems + label_problems


def duplicate_problems(samples: Iterable[AnchorSample]) -> list[str]:
    """Two images with one id (same stem in a split), and identical images in different splits (leakage)."""
    by_id: dict[str, list[AnchorSample]] = defaultdict(list)
    by_hash: dict[str, list[AnchorSample]] = defaultdict(list)
    for sample in samples:
        by_id[sample.id].append(sample)
        by_hash[sample.sha256].append(sample)
    problems = [
        f"{_paths(group)}: same id {key!r} (file stems in a split must differ)"
        for key, group in sorted(by_id.items())
        if len(group) > 1
    ]
    for digest, group in sorted(by_hash.items()):
        splits = sorted({s.split for s in group}, key=SPLITS.index)
        if len(splits) > 1:
            problems.append(
                f"{_paths(group)}: identical image content in splits {' and '.join(splits)} "
                f"(leakage; sha256 {digest[:12]})"
            )
        elif len(group) > 1:
            log.warning("identical images within split %s: %s", splits[0], _paths(group))
    return problems


def _paths(samples: list[AnchorSample]) -> str:
    return ", ".join(str(s.image) for s in samples)


def _progress(items: list, desc: str) -> Iterable:
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="img", disable=None, leave=False)


# --------------------------------------------------------------------------- writing


def write_anchor(plan: AnchorPlan, target: Path) -> None:
    """Write the anchor into a hidden folder beside ``target``, then swap it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        fill_anchor(staging, plan)
        _swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def fill_anchor(folder: Path, plan: AnchorPlan) -> None:
    """Copy images and labels, write data.yaml and manifest.jsonl into an empty ``folder``."""
    rows = []
    for sample in _progress(plan.samples, "writing anchor"):
        image = folder / "images" / sample.split / sample.image.name
        _copy_verified(sample.image, image, sample.sha256)
        label = folder / "labels" / sample.split / f"{sample.image.stem}.txt"
        if sample.label is not None:
            _copy_verified(sample.label, label)
        else:
            _write_bytes(label, b"")  # background image: an explicit, empty label file
        rows.append({"id": sample.id, "split": sample.split, "sha256": sample.sha256, "source": str(sample.image)})
    _write_bytes(folder / "data.yaml", anchor_data_yaml(plan.spec.names).encode("utf-8"))
    write_manifest(folder / MANIFEST, sorted(rows, key=lambda row: row["id"]))
    fsync_file(folder / MANIFEST)


def anchor_data_yaml(names: dict[int, str]) -> str:
    """The anchor's data.yaml text: splits under images/, names as {id: name}.

    There is deliberately no ``path:`` key: Ultralytics resolves a missing ``path`` to the yaml's
    folder (as detloop does), but ``path: .`` to the current working directory.
    """
    import yaml

    data = {**{split: f"images/{split}" for split in SPLITS}, "names": dict(names)}
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _copy_verified(source: Path, dest: Path, sha256: str | None = None) -> None:
    """Copy bytes (fsynced, renamed into place); when ``sha256`` is given they must still have that hash."""
    try:
        copy_atomic(source, dest, sha256)
    except ValueError as err:
        raise BadInput(
            "the source changed during the import; nothing was written",
            [f"{source}: content changed after it was validated"],
        ) from err


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    fsync_file(path)


def _swap_in(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an existing target goes to a backup that is deleted after."""
    if not target.exists():
        os.rename(staging, target)
    else:
        backup = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
        os.rename(target, backup)
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(backup, target)
            raise
        log.info("replaced the previous anchor at %s", target)
        shutil.rmtree(backup)
    fsync_file(target.parent)


# --------------------------------------------------------------------------- summary


def summarize(plan: AnchorPlan, target: Path) -> dict:
    """Counts per split (images, labelled, background, boxes), names and paths of an import."""
    splits = {split: {"images": 0, "labels": 0, "background": 0, "boxes": 0} for split in SPLITS}
    for sample in plan.samples:
        counts = splits[sample.split]
        counts["images"] += 1
        counts["labels" if sample.boxes else "background"] += 1
        counts["boxes"] += sample.boxes
    return {"target": str(target), "source": str(plan.spec.yaml_path), "names": dict(plan.spec.names), "splits": splits}


def _counts_text(splits: dict) -> str:
    return "; ".join(
        f"{split}: {c['images']} images ({c['background']} background), {c['boxes']} boxes"
        for split, c in splits.items()
    )
