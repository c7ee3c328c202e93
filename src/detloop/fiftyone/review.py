"""Review reported failures in the FiftyOne App; commit the decisions through :mod:`detloop.data.review`.

``detloop review open`` builds the inbox dataset (``<prefix>-inbox``): every waiting report with the
production model's predictions (``predictions_v<N>``) and the labels to verify (``ground_truth``:
the reporter's proposed labels when the report came with some, else the production predictions at
the serving confidence). In the App the reviewer

* tags a sample ``verified`` (it goes to the pool with its labels) or ``rejected`` (recorded, its
  files move to ``inbox/rejected/``; an optional reason in the sample field ``review_reason``),
* tags a wrong proposed box ``wrong`` (label tag): it is left out of the labels that go to the pool,
* or edits the boxes in an annotation tool through FiftyOne's annotation API
  (``fiftyone.review.annotation.backend``): ``detloop review annotate`` sends the undecided reports with
  their labels to verify to Label Studio (the local server of ``detloop annotation up``, see
  :mod:`detloop.fiftyone.labelstudio`, or ``FIFTYONE_LABELSTUDIO_URL`` / ``_API_KEY``); a report
  submitted there counts as tagged ``verified`` (``annotation.submitted_is_verified``), one skipped or
  left alone stays in the inbox. The commit loads the edits first (:func:`load_backend_annotations`).

Tags and edits live in the database as soon as they are made, so closing the App or losing the
process loses nothing. ``detloop review commit --reviewer NAME`` then hands the decisions to the
file-based review (:func:`detloop.data.review.review`): the same validation, the same pool and rejection
records (reviewer, time, fixed split), the same crash-safe write order. Untagged samples stay in
the inbox. A commit killed midway is finished by the next one (:func:`finish_interrupted`).
"""

from __future__ import annotations

import contextlib
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
from detloop.fiftyone import labelstudio
from detloop.fiftyone import load as fo_load
from detloop.fiftyone.labelstudio import Credentials
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
    if models:  # the review queue's order in the App: fields queue_rank, queue_score, queue_reason; saved view by-value
        from detloop.fiftyone import queue as review_queue

        result["queue_view"] = review_queue.show_in_app(dataset, review_queue.review_queue(cfg, models[0])).name
    r = cfg.fiftyone.review
    print(
        f"{dataset.name}: {len(dataset)} report(s) to review; {filled} with the model's predictions as "
        f"proposed labels. Tag samples '{r.verified_tag}' or '{r.rejected_tag}', then: "
        "detloop review commit --reviewer NAME"
    )
    if "queue_view" in result:
        print(f"saved view {result['queue_view']!r}: the reports most worth reviewing first (queue_reason says why)")
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
    loaded = load_backend_annotations(cfg, dataset)
    finished = finish_interrupted(cfg)
    removed = sync_with_inbox(cfg, dataset)
    verified, rejected = decisions(cfg, dataset)
    result = {
        "accepted": [],
        "rejected": [],
        "finished_interrupted": finished,
        "removed_stale": removed,
        "reviewer": reviewer.strip(),
        "annotations": loaded,  # the pending annotation run's backend and the reports submitted there
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


def _check_package(backend: str) -> None:
    """BadInput when the Python package a backend needs is not installed."""
    module = BACKEND_MODULES.get(backend)
    if module is None:
        return
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise BadInput(
            f"fiftyone.review.annotation.backend={backend}: the Python package {module!r} is not installed",
            [f"pip install {module} (and run its server), or set the backend to null to review in the App with tags"],
        )


def _backend(cfg: DictConfig) -> str | None:
    """The configured backend of ``detloop review annotate`` (its package checked), or None."""
    backend = cfg.fiftyone.review.annotation.backend
    if not backend:
        return None
    _check_package(str(backend))
    return str(backend)


def pending_backend(cfg: DictConfig, dataset) -> str | None:
    """The backend of the dataset's pending annotation run (``anno_key``), or None when there is none."""
    key = str(cfg.fiftyone.review.annotation.anno_key)
    if key not in dataset.list_annotation_runs():
        return None
    return str(dataset.get_annotation_info(key).config.method)


def backend_credentials(cfg: DictConfig, backend: str | None) -> Credentials | None:
    """Label Studio's URL and API key (environment, else the local server), checked to answer and accept
    the key; None for other backends (their credentials come from FiftyOne's annotation config)."""
    if backend != "labelstudio":
        return None
    creds = labelstudio.credentials(cfg)
    labelstudio.check(creds)
    return creds


def annotation_target(cfg: DictConfig) -> tuple[str, Credentials | None]:
    """The backend of ``detloop review annotate`` and, for Label Studio, its checked credentials.
    BadInput when no backend is configured, or the server does not answer or refuses the key."""
    backend = _backend(cfg)
    if backend is None:
        raise BadInput(
            "fiftyone.review.annotation.backend is null: review in the App with sample tags",
            ["set fiftyone.review.annotation.backend=labelstudio (or cvat) to edit labels there"],
        )
    return backend, backend_credentials(cfg, backend)


def _talking(creds: Credentials | None, action: str):
    return labelstudio.talking_to(creds, action) if creds is not None else contextlib.nullcontext()


def request_annotation(cfg: DictConfig, dataset, target: tuple[str, Credentials | None] | None = None) -> dict:
    """``detloop review annotate``: send the reports still undecided (neither ``verified`` nor ``rejected``)
    with their labels to verify to the configured backend through FiftyOne's ``annotate``.

    A pending run is loaded first (:func:`load_backend_annotations`: its edits and submissions are kept in
    the dataset); then, when reports are left to send, its backend project is deleted and a new run starts.
    Reports no longer in the inbox are dropped from the dataset first. Returns the key, the number of
    reports sent and, for Label Studio, the project's id and URL. BadInput when no backend is configured,
    nothing is undecided (a pending run stays), or the server does not answer or refuses the key.
    """
    backend, creds = target or annotation_target(cfg)
    a, r = cfg.fiftyone.review.annotation, cfg.fiftyone.review
    key = str(a.anno_key)
    sync_with_inbox(cfg, dataset)
    previous = load_backend_annotations(cfg, dataset)
    todo = dataset.match_tags([str(r.verified_tag), str(r.rejected_tag)], bool=False)
    if not len(todo):
        raise BadInput(
            f"{dataset.name}: no report left to annotate (each is tagged {r.verified_tag!r} or {r.rejected_tag!r})",
            ["commit them: detloop review commit --reviewer NAME"],
        )
    if previous is not None:
        old = backend_credentials(cfg, previous["backend"]) if previous["backend"] != backend else creds
        with _talking(old, "deleting the previous project"):
            dataset.load_annotation_results(key, **(old.kwargs() if old else {})).cleanup()
        dataset.delete_annotation_run(key)
    kwargs = dict(a.kwargs or {})
    if backend == "labelstudio":
        kwargs = {"project_name": dataset.name, "attributes": False, **kwargs, **creds.kwargs()}
    with _talking(creds, f"sending {len(todo)} report(s)"):
        todo.annotate(
            key,
            backend=backend,
            label_field=str(r.label_field),
            label_type="detections",
            classes=list(dataset.default_classes),
            launch_editor=bool(a.launch_editor),
            **kwargs,
        )
    sent = {"key": key, "backend": backend, "samples": len(todo), "replaced": previous}
    if creds is not None:
        project = dataset.load_annotation_results(key, **creds.kwargs()).project_id
        sent.update(project_id=project, url=f"{creds.url}/projects/{project}", credentials=creds.source)
    return sent


def load_backend_annotations(cfg: DictConfig, dataset) -> dict | None:
    """Merge the edits of the pending annotation run into the labels to verify (FiftyOne's
    ``load_annotations``: moved, added and deleted boxes), whatever backend is configured now.

    With ``fiftyone.review.annotation.submitted_is_verified`` every report submitted there (Label Studio:
    a task with a submitted annotation that was not skipped) is tagged ``verified_tag``, so the commit
    moves it to the pool like a report tagged in the App; one tagged ``rejected_tag`` in the App stays
    rejected. Reports left untouched, or skipped, stay in the inbox. None when no run is pending;
    BadInput (nothing changed) when the server does not answer or refuses the key.
    """
    backend = pending_backend(cfg, dataset)
    if backend is None:
        return None
    _check_package(backend)
    key = str(cfg.fiftyone.review.annotation.anno_key)
    creds = backend_credentials(cfg, backend)
    kwargs = creds.kwargs() if creds else {}
    done: set[str] = set()
    if creds is not None:
        results = dataset.load_annotation_results(key, **kwargs)
        present = set(dataset.values("id"))
        done = labelstudio.submitted(creds, results.project_id, results.uploaded_tasks) & present
    with _talking(creds, "loading the annotations"):
        dataset.load_annotations(key, cleanup=False, unexpected="ignore", progress=False, **kwargs)
    verified: list[str] = []
    if done and bool(cfg.fiftyone.review.annotation.submitted_is_verified):
        view, rejected = dataset.select(sorted(done)), str(cfg.fiftyone.review.rejected_tag)
        if len(kept := view.match_tags(rejected)):  # an explicit rejection in the App wins over a submission
            ids = kept.values("detloop_id")
            log.warning("submitted in %s but tagged %r in the App, so they stay rejected: %s", backend, rejected, ids)
            view = view.match_tags(rejected, bool=False)
        tag = str(cfg.fiftyone.review.verified_tag)
        view.tag_samples(tag)
        verified = sorted(view.values("detloop_id"))
        log.info("%d report(s) submitted in %s tagged %r: %s", len(verified), backend, tag, verified)
    return {"backend": backend, "submitted": verified}
