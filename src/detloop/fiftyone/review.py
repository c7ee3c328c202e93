"""Review reported failures in the FiftyOne App; commit the decisions through :mod:`detloop.data.review`.

``detloop review open`` builds the inbox dataset (``<prefix>-inbox``): every waiting report with the
production model's predictions (``predictions_v<N>``) and the labels to verify (``ground_truth``:
the reporter's proposed labels when the report came with some, else the production predictions at
the serving confidence). In the App the reviewer

* tags a sample ``verified`` (it goes to the pool with its labels) or ``rejected`` (recorded, its
  files move to ``inbox/rejected/``; an optional reason in the sample field ``review_reason``),
* tags a wrong proposed box ``wrong`` (label tag): it is left out of the labels that go to the pool,
* or edits the labels with an annotation backend (``fiftyone.review.annotation.backend``, e.g.
  CVAT or Label Studio, installed separately) through FiftyOne's annotation API.

Tags and edits live in the database as soon as they are made, so closing the App or losing the
process loses nothing. ``detloop review commit --reviewer NAME`` then hands the decisions to the
file-based review (:func:`detloop.data.review.review`): the same validation, the same pool and rejection
records (reviewer, time, fixed split), the same crash-safe write order. Untagged samples stay in
the inbox. A commit killed midway is finished by the next one (:func:`finish_interrupted`).
"""

from __future__ import annotations

import logging
import tempfile
from collections import defaultdict
from pathlib import Path

from omegaconf import DictConfig

from detloop.core.config import resolve_path
from detloop.core.errors import BadInput
from detloop.data import review as file_review
from detloop.data.manifest import MANIFEST, read_manifest
from detloop.data.store import REJECTED_DIR, REJECTED_MANIFEST, find_image, locked
from detloop.fiftyone import load as fo_load
from detloop.fiftyone.load import dataset_name, read_yolo_labels

log = logging.getLogger(__name__)

DEFAULT_REASON = "rejected in the FiftyOne App"
BACKEND_MODULES = {"labelstudio": "label_studio_sdk", "labelbox": "labelbox"}  # extra packages a backend needs
TAG_PATHS_GROUP = "_label_tags"  # a sidebar group the App does not display (see show_in_app)


def review_dataset(cfg: DictConfig):
    """The inbox review dataset (BadInput when ``detloop review open`` has not built it)."""
    import fiftyone as fo

    name = dataset_name(cfg, str(cfg.fiftyone.review.dataset))
    if not fo.dataset_exists(name):
        raise BadInput(f"no review dataset {name!r}", ["run `detloop review open` first"])
    return fo.load_dataset(name)


def open_review(cfg: DictConfig, models: list[dict]) -> tuple[dict, object]:
    """``detloop review open``: the inbox dataset brought up to date with the inbox, each model's
    predictions added (``models`` from :func:`detloop.fiftyone.inspection.resolve_models`) and, for reports
    without labels, proposed as the labels to verify; shown in the App with the review tags.
    Prints what waits for review; returns ``(result, dataset)``."""
    from detloop.data.datasets import anchor_names

    names = anchor_names(resolve_path(cfg, "anchor"))
    finish_interrupted(cfg)
    dataset = fo_load.load_set(cfg, str(cfg.fiftyone.review.dataset), names)
    sync_with_inbox(cfg, dataset)
    fields, filled = [], 0
    for model in models:
        field = fo_load.add_predictions(cfg, dataset, model)
        fields.append(field)
        filled += fo_load.fill_review_labels(cfg, dataset, field)
    show_in_app(cfg, dataset)
    result = {"dataset": dataset.name, "samples": len(dataset), "fields": fields, "proposed_from_predictions": filled}
    r = cfg.fiftyone.review
    print(
        f"{dataset.name}: {len(dataset)} report(s) to review; {filled} with the model's predictions as "
        f"proposed labels. Tag samples '{r.verified_tag}' or '{r.rejected_tag}', then: "
        "detloop review commit --reviewer NAME"
    )
    return result, dataset


def show_in_app(cfg: DictConfig, dataset) -> None:
    """The review dataset opens with its sample tags, the labels to verify and the predictions shown.

    The App (FiftyOne 1.22) checks by default only the ``active_fields`` paths it finds in the sidebar
    groups, and it always rebuilds its "tags" group empty: ``tags`` in ``active_fields`` alone stays
    unchecked. A group named ``_label_tags`` is left out of the displayed sidebar but its paths count,
    so it carries ``tags`` and ``_label_tags`` and the grid shows the tag pills. The review tags get
    colours of their own (``fiftyone.review.verified_color`` / ``rejected_color``).
    """
    import fiftyone as fo
    from fiftyone.core.odm.dataset import ActiveFields, SidebarGroupDocument

    review = cfg.fiftyone.review
    label_field = str(review.label_field)
    fields = [f for f in dataset.get_field_schema() if f == label_field or f.startswith("predictions_")]
    tag_paths = ["tags", "_label_tags"]
    config = dataset.app_config
    config.active_fields = ActiveFields(paths=[*tag_paths, *fields])
    groups = config.sidebar_groups or fo.DatasetAppConfig.default_sidebar_groups(dataset)
    config.sidebar_groups = [
        *(g for g in groups if g.name != TAG_PATHS_GROUP),
        SidebarGroupDocument(name=TAG_PATHS_GROUP, paths=tag_paths),
    ]
    tag_colors = [
        {"value": str(review.verified_tag), "color": str(review.verified_color)},
        {"value": str(review.rejected_tag), "color": str(review.rejected_color)},
        {"value": "inbox", "color": "#757575"},
    ]  # the tag every inbox sample has: neutral
    config.color_scheme = fo.ColorScheme(color_by="value", fields=[{"path": "tags", "valueColors": tag_colors}])
    dataset.save()


# --------------------------------------------------------------------------- labels -> YOLO text


def yolo_text(detections, class_ids: dict[str, int], drop_tag: str, where: str) -> str:
    """YOLO label text (``cls xc yc w h``, 6 decimals) of FiftyOne detections, leaving out boxes
    tagged ``drop_tag``. Raises BadInput for a label the anchor's classes do not have."""
    lines = []
    for det in detections.detections if detections is not None else []:
        if drop_tag in (det.tags or []):
            continue
        if det.label not in class_ids:
            raise BadInput(
                f"{where}: label {det.label!r} is not an anchor class", [f"anchor classes: {', '.join(class_ids)}"]
            )
        x, y, w, h = (min(max(float(v), 0.0), 1.0) for v in det.bounding_box)
        w, h = min(w, 1.0 - x), min(h, 1.0 - y)
        lines.append(f"{class_ids[det.label]} {x + w / 2:.6f} {y + h / 2:.6f} {w:.6f} {h:.6f}")
    return "".join(line + "\n" for line in lines)


def _same_labels(text: str, proposed: Path) -> bool:
    """Do the verified labels equal the proposed label file (to the written precision)?"""
    if not proposed.is_file():
        return False
    ours, theirs = read_yolo_labels_text(text), read_yolo_labels(proposed)
    return ours.shape == theirs.shape and bool((abs(ours - theirs) <= 1e-6).all())


def read_yolo_labels_text(text: str):
    import numpy as np

    rows = [line.split() for line in text.splitlines() if line.strip()]
    return np.array([[float(v) for v in row[:5]] for row in rows], dtype=np.float64).reshape(-1, 5)


# --------------------------------------------------------------------------- commit


def finish_interrupted(cfg: DictConfig) -> dict[str, list[str]]:
    """Finish reviews killed after their record was written but before the inbox was cleaned.

    :mod:`detloop.data.review` writes the pool (or rejection) record before it rewrites the inbox
    manifest, so a kill in between leaves a sample recorded *and* still listed in the inbox. The
    record is the decision: such samples are removed from the inbox (accepted: their inbox files
    deleted, the pool copy is complete; rejected: files moved to ``inbox/rejected/``).
    """
    inbox = resolve_path(cfg, "inbox")
    done: dict[str, list[str]] = {"accepted": [], "rejected": []}
    with locked(inbox):
        state = file_review.read_state(cfg)
        for sample_id, row in state.inbox.items():
            kind = "accepted" if sample_id in state.pool else "rejected" if sample_id in state.rejected else None
            if kind is None:
                continue
            image = find_image(inbox / "images", sample_id) or inbox / "images" / f"{sample_id}.missing"
            item = file_review.ReviewItem(row, image, None)
            file_review.remove_from_inbox(inbox, [item], move_to=None if kind == "accepted" else inbox / REJECTED_DIR)
            done[kind].append(sample_id)
    if done["accepted"] or done["rejected"]:
        log.warning("finished interrupted reviews: %s", done)
    return done


def sync_with_inbox(cfg: DictConfig, dataset) -> list[str]:
    """Delete dataset samples whose report no longer waits in the inbox (reviewed elsewhere or by an
    earlier commit); returns their detloop ids."""
    waiting = {row["id"] for row in read_manifest(resolve_path(cfg, "inbox") / MANIFEST)}
    ids, detloop_ids = dataset.values("id"), dataset.values("detloop_id")
    gone = [(i, d) for i, d in zip(ids, detloop_ids, strict=True) if d not in waiting]
    if gone:
        dataset.delete_samples([i for i, _ in gone])
    return [d for _, d in gone]


def decisions(cfg: DictConfig, dataset) -> tuple[list, list]:
    """(verified samples, rejected samples) by their tags; BadInput for a sample tagged both."""
    r = cfg.fiftyone.review
    verified = list(dataset.match_tags(str(r.verified_tag)))
    rejected = list(dataset.match_tags(str(r.rejected_tag)))
    both = sorted({s.detloop_id for s in verified} & {s.detloop_id for s in rejected})
    if both:
        raise BadInput(
            f"{len(both)} sample(s) tagged both {r.verified_tag!r} and {r.rejected_tag!r}; nothing was committed",
            [f"{i}: remove one of the tags" for i in both],
        )
    return verified, rejected


def write_verified_labels(cfg: DictConfig, samples: list, folder: Path, names: dict[int, str]) -> int:
    """Each verified sample's labels as ``folder/<id>.txt`` when they differ from the proposed inbox
    labels (unchanged ones are recorded as ``proposed`` by the review); returns how many were written."""
    r = cfg.fiftyone.review
    class_ids = {name: cid for cid, name in names.items()}
    proposed = resolve_path(cfg, "inbox") / "labels"
    written = 0
    for sample in samples:
        text = yolo_text(
            sample[str(r.label_field)] if sample.has_field(str(r.label_field)) else None,
            class_ids,
            str(r.drop_label_tag),
            sample.detloop_id,
        )
        if not _same_labels(text, proposed / f"{sample.detloop_id}.txt"):
            (folder / f"{sample.detloop_id}.txt").write_text(text, encoding="utf-8")
            written += 1
    return written


def commit(cfg: DictConfig, reviewer: str | None) -> dict:
    """Move the ``verified`` samples of the review dataset to the pool and record the ``rejected`` ones,
    through :func:`detloop.data.review.review`; untagged samples stay. Returns what was done."""
    from detloop.data.datasets import anchor_names

    if not (reviewer or "").strip():
        raise BadInput("--reviewer: required (who verified these samples); reviews are recorded by name")
    dataset = review_dataset(cfg)
    load_backend_annotations(cfg, dataset)
    finished = finish_interrupted(cfg)
    removed = sync_with_inbox(cfg, dataset)
    verified, rejected = decisions(cfg, dataset)
    result = {
        "accepted": [],
        "rejected": [],
        "finished_interrupted": finished,
        "removed_stale": removed,
        "reviewer": reviewer.strip(),
    }
    if verified:
        with tempfile.TemporaryDirectory(prefix="detloop-review-") as tmp:
            write_verified_labels(cfg, verified, Path(tmp), anchor_names(resolve_path(cfg, "anchor")))
            done = file_review.review(cfg, "accept", [s.detloop_id for s in verified], reviewer, labels_dir=Path(tmp))
        result["accepted"] = done["ids"]
        dataset.delete_samples([s.id for s in verified])
    by_reason: dict[str, list] = defaultdict(list)
    reason_field = str(cfg.fiftyone.review.reason_field)
    for sample in rejected:
        reason = sample[reason_field] if sample.has_field(reason_field) else None
        by_reason[str(reason or DEFAULT_REASON)].append(sample)
    for reason, samples in by_reason.items():
        done = file_review.review(cfg, "reject", [s.detloop_id for s in samples], reviewer, reason=reason)
        result["rejected"] += done["ids"]
        dataset.delete_samples([s.id for s in samples])
    result["inbox_size"] = len(read_manifest(resolve_path(cfg, "inbox") / MANIFEST))
    result["pool_size"] = len(read_manifest(resolve_path(cfg, "pool") / MANIFEST))
    result["rejected_total"] = len(read_manifest(resolve_path(cfg, "inbox") / REJECTED_MANIFEST))
    result["waiting_in_app"] = len(dataset)
    log.info(
        "review commit by %s: %d accepted, %d rejected, %d waiting",
        result["reviewer"],
        len(result["accepted"]),
        len(result["rejected"]),
        len(dataset),
    )
    return result


# --------------------------------------------------------------------------- annotation backend


def _backend(cfg: DictConfig) -> str | None:
    backend = cfg.fiftyone.review.annotation.backend
    if not backend:
        return None
    module = BACKEND_MODULES.get(str(backend))
    if module is not None:
        import importlib.util

        if importlib.util.find_spec(module) is None:
            raise BadInput(
                f"fiftyone.review.annotation.backend={backend}: the Python package {module!r} is not installed",
                [
                    f"pip install {module} (and run its server), or set the "
                    "backend to null to review in the App with tags"
                ],
            )
    return str(backend)


def request_annotation(cfg: DictConfig, dataset) -> str:
    """Send the labels to verify to the configured annotation backend (FiftyOne's ``annotate``);
    returns the annotation key. BadInput when no backend is configured or it is not installed."""
    backend = _backend(cfg)
    if backend is None:
        raise BadInput(
            "fiftyone.review.annotation.backend is null: review in the App with sample tags",
            ["set fiftyone.review.annotation.backend=cvat (or labelstudio) to edit labels there"],
        )
    a, r = cfg.fiftyone.review.annotation, cfg.fiftyone.review
    key = str(a.anno_key)
    if key in dataset.list_annotation_runs():
        dataset.delete_annotation_run(key)
    kwargs = dict(a.kwargs or {})
    dataset.annotate(
        key,
        backend=backend,
        label_field=str(r.label_field),
        label_type="detections",
        classes=list(dataset.default_classes),
        launch_editor=bool(a.launch_editor),
        **kwargs,
    )
    return key


def load_backend_annotations(cfg: DictConfig, dataset) -> bool:
    """Merge the backend's edits into the labels to verify, when an annotation run is pending."""
    backend = _backend(cfg)
    key = str(cfg.fiftyone.review.annotation.anno_key)
    if backend is None or key not in dataset.list_annotation_runs():
        return False
    dataset.load_annotations(key, cleanup=False)
    return True
