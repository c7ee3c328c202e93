"""Load detloop's data sets and model predictions into persistent FiftyOne datasets.

One dataset per set: ``<prefix>-anchor-train|val|test``, ``<prefix>-pool`` and ``<prefix>-inbox``,
each sample with its ``ground_truth`` (YOLO labels; for the inbox the reporter's proposed labels in
``reported_labels``), the detloop id and split as a tag. Model predictions go to
``predictions_v<N>`` (a registry version) or ``predictions_<name>`` (a local weights file), as
FiftyOne ``Detections`` with normalized top-left boxes and the model's class names; instance
segmentation models add a mask per detection, cropped to its box (FiftyOne's convention).

Writes are batched: new samples with one insert per batch and predictions with one ``set_values``
per field (keyed by file path), never a ``sample.save()`` per sample. With FiftyOne
:data:`FAST_WRITES_VERSION` (:func:`fast_writes`), samples and labels are written as the documents
FiftyOne stores for them, built as plain dicts (:func:`detections_doc`), instead of one ``fo.Detection``
object per box and ``add_samples``; with any other version through ``fo.Sample`` / ``fo.Detections``
objects. Both store the same documents. Re-loading a set adds the new samples and drops those that left
it (e.g. reviewed inbox reports); labels already in the dataset, such as a reviewer's edits, are kept.
The pure converters here need neither FiftyOne's database nor MLflow; FiftyOne is imported by the
functions that use it (call :func:`detloop.fiftyone.db.connect` first, so that they use the project's
database).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from detloop.core.config import resolve_path
from detloop.core.errors import BadInput
from detloop.data.manifest import MANIFEST, read_manifest
from detloop.data.yolo_format import is_image_name, label_path_for

log = logging.getLogger(__name__)

ANCHOR_SETS = ("anchor-train", "anchor-val", "anchor-test")
SETS = (*ANCHOR_SETS, "pool", "inbox")
GT_FIELD = "ground_truth"
REPORTED_FIELD = "reported_labels"
FAST_WRITES_VERSION = "1.22.0"  # the FiftyOne release whose stored documents the fast writes reproduce


@dataclass(frozen=True)
class SetSample:
    """One image of a detloop set: file, detloop id, tags, label file and extra fields."""

    filepath: Path
    sample_id: str
    tags: tuple[str, ...]
    labels: Path | None
    fields: dict


# --------------------------------------------------------------------------- converters (pure)


def yolo_to_boxes(rows: np.ndarray) -> np.ndarray:
    """YOLO ``xc yc w h`` (normalized, centred) -> FiftyOne ``x y w h`` (normalized, top-left), a copy."""
    boxes = np.asarray(rows, dtype=np.float64).reshape(-1, 4).copy()
    boxes[:, 0] -= boxes[:, 2] / 2.0
    boxes[:, 1] -= boxes[:, 3] / 2.0
    return boxes


def class_names(class_ids: Sequence[int] | np.ndarray, names: dict[int, str]) -> list[str]:
    """Class ids -> names; an id the mapping lacks is named ``class_<id>`` (and logged once)."""
    ids = [int(c) for c in np.asarray(class_ids).reshape(-1)]
    unknown = sorted({c for c in ids if c not in names})
    if unknown:
        log.warning("class ids %s have no name; shown as class_<id>", unknown)
    return [names.get(c, f"class_{c}") for c in ids]


def read_yolo_labels(path: Path | None) -> np.ndarray:
    """(N, 5) ``cls xc yc w h`` rows of a YOLO label file; (0, 5) when missing or empty."""
    if path is None or not Path(path).is_file():
        return np.zeros((0, 5))
    rows = [line.split() for line in Path(path).read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    return np.array([[float(v) for v in row[:5]] for row in rows], dtype=np.float64).reshape(-1, 5)


def crop_mask(mask: np.ndarray, box_xyxy: Sequence[float]) -> np.ndarray:
    """The part of a full-image mask (H, W) inside a pixel xyxy box, as bool (FiftyOne's instance mask).

    The box is rounded outward to whole pixels and clipped to the image; never empty (at least 1x1).
    """
    height, width = mask.shape[:2]
    x0, y0 = int(np.floor(max(box_xyxy[0], 0))), int(np.floor(max(box_xyxy[1], 0)))
    x1, y1 = int(np.ceil(min(box_xyxy[2], width))), int(np.ceil(min(box_xyxy[3], height)))
    x0, y0 = min(x0, width - 1), min(y0, height - 1)
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
    return np.asarray(mask[y0:y1, x0:x1] > 0.5)


def detections_from_yolo(rows: np.ndarray, names: dict[int, str]):
    """``fo.Detections`` from YOLO label rows (``cls xc yc w h``, normalized); empty rows -> no detections."""
    import fiftyone as fo

    rows = np.asarray(rows, dtype=np.float64).reshape(-1, 5)
    boxes = yolo_to_boxes(rows[:, 1:5])
    labels = class_names(rows[:, 0].astype(np.int64), names)
    return fo.Detections(
        detections=[
            fo.Detection(label=label, bounding_box=box.tolist()) for label, box in zip(labels, boxes, strict=True)
        ]
    )


def detections_from_pixels(
    boxes_xyxy: np.ndarray,
    cls: np.ndarray,
    conf: np.ndarray,
    size: tuple[int, int],
    names: dict[int, str],
    masks: Sequence[np.ndarray] | None = None,
):
    """``fo.Detections`` from a model's pixel xyxy boxes, class ids and confidences on an image of
    ``size`` (width, height); ``masks`` (optional) are full-image masks, cropped to each box."""
    import fiftyone as fo

    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    rel = pixel_boxes_to_relative(boxes, size)
    labels = class_names(cls, names)
    out = []
    for i, (label, box, score) in enumerate(zip(labels, rel, np.asarray(conf).reshape(-1), strict=True)):
        det = fo.Detection(label=label, bounding_box=box.tolist(), confidence=float(score))
        if masks is not None:
            det.mask = crop_mask(masks[i], boxes[i])
        out.append(det)
    return fo.Detections(detections=out)


# --------------------------------------------------------------------------- stored documents


def fast_writes() -> bool:
    """Whether samples and labels are written as FiftyOne's stored documents (plain dicts) rather than
    through ``fo.Sample`` / ``fo.Detection`` objects: only with FiftyOne :data:`FAST_WRITES_VERSION`,
    whose document layout :func:`detections_doc` and :func:`_sample_doc` reproduce and whose private
    parts they use (``Dataset._sample_collection``, ``fiftyone.core.odm.sample._generate_rand``)."""
    import fiftyone as fo

    if fo.__version__ != FAST_WRITES_VERSION:
        return False
    from fiftyone.core.odm import sample as odm_sample

    return callable(getattr(odm_sample, "_generate_rand", None)) and hasattr(fo.Dataset, "_sample_collection")


def pixel_boxes_to_relative(boxes_xyxy: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Pixel ``x0 y0 x1 y1`` on an image of ``size`` (width, height) -> normalized top-left ``x y w h``."""
    width, height = size
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    return np.stack(
        [
            boxes[:, 0] / width,
            boxes[:, 1] / height,
            (boxes[:, 2] - boxes[:, 0]) / width,
            (boxes[:, 3] - boxes[:, 1]) / height,
        ],
        axis=1,
    )


def detections_doc(labels: Sequence[str], boxes: np.ndarray, confidences: np.ndarray | None = None) -> dict:
    """The document FiftyOne stores for ``fo.Detections`` of ``fo.Detection(label, bounding_box[,
    confidence])`` (``Detections.to_dict()``: same keys, order and types, a new id per detection).

    ``boxes`` are normalized top-left ``x y w h``. Only for FiftyOne :data:`FAST_WRITES_VERSION`.
    """
    from bson import ObjectId

    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).tolist()
    if len(labels) != len(boxes):
        raise ValueError(f"{len(labels)} labels for {len(boxes)} boxes")
    dets = [
        {"_id": ObjectId(), "_cls": "Detection", "attributes": {}, "tags": [], "label": label, "bounding_box": box}
        for label, box in zip(labels, boxes, strict=True)
    ]
    if confidences is not None:  # the last key, as Detection(..., confidence=...) stores it
        scores = np.asarray(confidences, dtype=np.float64).reshape(-1).tolist()
        if len(scores) != len(boxes):
            raise ValueError(f"{len(scores)} confidences for {len(boxes)} boxes")
        for det, score in zip(dets, scores, strict=True):
            det["confidence"] = score
    return {"_cls": "Detections", "detections": dets}


def _copy_doc(doc: dict) -> dict:
    """A copy of a :func:`detections_doc` with new detection ids (what ``Detections.copy()`` stores)."""
    from bson import ObjectId

    return {
        "_cls": doc["_cls"],
        "detections": [
            {**d, "_id": ObjectId(), "attributes": {}, "tags": [], "bounding_box": list(d["bounding_box"])}
            for d in doc["detections"]
        ],
    }


# --------------------------------------------------------------------------- the sets


def dataset_name(cfg: DictConfig, set_name: str) -> str:
    return f"{cfg.fiftyone.dataset_prefix}-{set_name}"


def check_sets(sets: Sequence[str]) -> list[str]:
    """The set names, validated (BadInput naming the unknown ones)."""
    unknown = [s for s in sets if s not in SETS]
    if unknown:
        raise BadInput(f"unknown set(s) {unknown}", [f"fiftyone.sets: choose from {', '.join(SETS)}"])
    return list(dict.fromkeys(sets))


def set_samples(cfg: DictConfig, set_name: str) -> list[SetSample]:
    """The images of a detloop set with their labels and fields, in a fixed order."""
    if set_name in ANCHOR_SETS:
        split = set_name.split("-", 1)[1]
        folder = resolve_path(cfg, "anchor") / "images" / split
        images = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_name(p)) if folder.is_dir() else []
        return [SetSample(p, p.stem, (split,), label_path_for(p), {}) for p in images]
    folder = resolve_path(cfg, set_name)
    images = {p.stem: p for p in (folder / "images").glob("*") if p.is_file() and is_image_name(p)}
    out = []
    for row in read_manifest(folder / MANIFEST):
        image = images.get(row["id"])
        if image is None:
            log.warning("%s: no image for manifest row %s; skipped", folder / MANIFEST, row["id"])
            continue
        if set_name == "pool":
            fields = {k: row.get(k) for k in ("reviewer", "verified_at", "reported_at", "source", "labels_from")}
            out.append(
                SetSample(
                    image, row["id"], (str(row.get("split", "")),), folder / "labels" / f"{row['id']}.txt", fields
                )
            )
        else:
            fields = {k: row.get(k) for k in ("reported_at", "source", "note")}
            out.append(SetSample(image, row["id"], ("inbox",), folder / "labels" / f"{row['id']}.txt", fields))
    return out


def load_set(cfg: DictConfig, set_name: str, names: dict[int, str]):
    """The persistent dataset of ``set_name``, created or brought up to date with the files; returns it.

    New images are added with their labels (``ground_truth``; for the inbox ``reported_labels``, and
    ``ground_truth`` starts as a copy for the reviewer to verify); samples whose image left the set
    are deleted from the dataset. Existing samples and their labels are not touched.
    """
    import fiftyone as fo

    name = dataset_name(cfg, set_name)
    dataset = fo.load_dataset(name) if fo.dataset_exists(name) else fo.Dataset(name, persistent=True)
    dataset.info.update({"detloop_set": set_name, "classes": [names[k] for k in sorted(names)]})
    dataset.default_classes = [names[k] for k in sorted(names)]
    dataset.save()
    wanted = set_samples(cfg, set_name)
    have = dict(zip(dataset.values("filepath"), dataset.values("id"), strict=True)) if len(dataset) else {}
    keep = {str(s.filepath.absolute()) for s in wanted}
    gone = [sample_id for path, sample_id in have.items() if path not in keep]
    if gone:
        dataset.delete_samples(gone)
        log.info("%s: %d sample(s) no longer in the set removed", name, len(gone))
    new = [s for s in wanted if str(s.filepath.absolute()) not in have]
    if new:
        _add_new(fo, dataset, new, set_name, names, int(cfg.fiftyone.batch_size))
    log.info("%s: %d samples (%d new)", name, len(dataset), len(new))
    return dataset


def _add_new(fo, dataset, new: list[SetSample], set_name: str, names: dict[int, str], batch: int) -> None:
    """Add the samples of ``new`` (in order) with their labels and image sizes, ``batch`` per write.

    With :func:`fast_writes`, the samples up to the last one that brings a field the dataset does not
    declare yet go through ``add_samples`` (so FiftyOne declares every field itself, in its own order,
    and checks the media), the rest are inserted as the documents ``add_samples`` would store, once
    their values fit the declared fields; otherwise every sample goes through ``add_samples``.
    """
    from detloop.evaluation.evaluator import image_size

    sizes = [image_size(s.filepath) for s in new]
    head = len(new)
    if fast_writes():
        known = set(dataset.get_field_schema(include_private=True))
        head = 1
        for i, item in enumerate(new):
            fields = set(_field_values(item, set_name))
            if fields - known:
                head, known = i + 1, known | fields
    for start in range(0, head, batch):
        stop = min(start + batch, head)
        dataset.add_samples(
            [_sample(fo, s, set_name, names, size) for s, size in zip(new[start:stop], sizes[start:stop], strict=True)],
            progress=False,
        )
    if head == len(new):
        return
    rest, rest_sizes = new[head:], sizes[head:]
    misfit = _misfit(fo, dataset, rest, set_name)
    if misfit:
        log.debug("%s: %s; adding through add_samples", dataset.name, misfit)
        for start in range(0, len(rest), batch):
            chunk = zip(rest[start : start + batch], rest_sizes[start : start + batch], strict=True)
            dataset.add_samples([_sample(fo, s, set_name, names, size) for s, size in chunk], progress=False)
        return
    _insert_samples(dataset, rest, rest_sizes, set_name, names, batch)


def _field_values(item: SetSample, set_name: str) -> dict:
    """The fields ``add_samples`` stores for a sample (its non-None ones), labels as ``True``."""
    out = {"filepath": True, "tags": True, "metadata": True, "detloop_id": item.sample_id}
    out.update({k: v for k, v in item.fields.items() if v is not None})
    if set_name == "inbox":
        if item.labels is not None and item.labels.is_file():
            out[REPORTED_FIELD] = out[GT_FIELD] = True
    else:
        out[GT_FIELD] = True
    return out


def _misfit(fo, dataset, items: list[SetSample], set_name: str) -> str | None:
    """Why the documents of ``items`` cannot be inserted as they are (a value of a type other than its
    field's, a field not declared, not an image dataset), or None when they can."""
    if dataset.media_type != "image":
        return f"media type {dataset.media_type!r}"
    schema = dataset.get_field_schema(include_private=True)
    for label_field in (GT_FIELD, REPORTED_FIELD):
        field = schema.get(label_field)
        if field is not None and not (
            isinstance(field, fo.EmbeddedDocumentField) and field.document_type is fo.Detections
        ):
            return f"{label_field} is a {type(field).__name__}, not Detections"
    kinds = {bool: fo.BooleanField, int: fo.IntField, float: fo.FloatField, str: fo.StringField}
    for item in items:
        for key, value in _field_values(item, set_name).items():
            if value is True and key in ("filepath", "tags", "metadata", GT_FIELD, REPORTED_FIELD):
                if key not in schema:
                    return f"field {key} not declared"
                continue
            kind = kinds.get(type(value))
            if kind is None or type(schema.get(key)) is not kind:
                return f"{key}={value!r} does not fit {type(schema.get(key)).__name__}"
    return None


def _insert_samples(
    dataset, items: list[SetSample], sizes: list[tuple[int, int]], set_name: str, names: dict[int, str], batch: int
) -> None:
    """Insert the documents of ``items`` into the dataset's sample collection, ``batch`` per ``insert_many``."""
    from datetime import UTC, datetime

    from fiftyone.core.odm.sample import _generate_rand
    from pymongo.errors import BulkWriteError

    collection = dataset._sample_collection
    dataset_id = dataset._doc.id
    for start in range(0, len(items), batch):
        now = datetime.now(UTC).replace(tzinfo=None)  # FiftyOne stores naive UTC times
        docs = [
            _sample_doc(item, size, set_name, names, dataset_id, now, _generate_rand())
            for item, size in zip(items[start : start + batch], sizes[start : start + batch], strict=True)
        ]
        try:
            collection.insert_many(docs)
        except BulkWriteError as err:  # as add_samples reports it
            raise ValueError(err.details["writeErrors"][0]["errmsg"]) from err


def _sample_doc(item: SetSample, size: tuple[int, int], set_name: str, names: dict[int, str], dataset_id, now, rand):
    """The document ``add_samples`` stores for :func:`_sample` of ``item`` (same keys, order and values)."""
    width, height = size
    doc = {
        "filepath": str(item.filepath.absolute()),
        "tags": [t for t in item.tags if t],
        "metadata": {"_cls": "ImageMetadata", "width": width, "height": height},
        "created_at": now,
        "last_modified_at": now,
        "_media_type": "image",
        "_rand": rand,
        "_dataset_id": dataset_id,
        "detloop_id": item.sample_id,
    }
    doc.update({k: v for k, v in item.fields.items() if v is not None})
    if set_name == "inbox" and not (item.labels is not None and item.labels.is_file()):
        return doc
    rows = read_yolo_labels(item.labels)
    labels = detections_doc(class_names(rows[:, 0].astype(np.int64), names), yolo_to_boxes(rows[:, 1:5]))
    if set_name == "inbox":
        doc[REPORTED_FIELD] = labels
        doc[GT_FIELD] = _copy_doc(labels)
    else:
        doc[GT_FIELD] = labels
    return doc


def _sample(fo, item: SetSample, set_name: str, names: dict[int, str], size: tuple[int, int]):
    width, height = size
    labels = detections_from_yolo(read_yolo_labels(item.labels), names)
    sample = fo.Sample(
        filepath=str(item.filepath.absolute()),
        tags=[t for t in item.tags if t],
        metadata=fo.ImageMetadata(width=width, height=height),
        detloop_id=item.sample_id,
        **{k: v for k, v in item.fields.items() if v is not None},
    )
    if set_name == "inbox":
        has_labels = item.labels is not None and item.labels.is_file()
        sample[REPORTED_FIELD] = labels if has_labels else None
        sample[GT_FIELD] = labels.copy() if has_labels else None  # filled from predictions when None
    else:
        sample[GT_FIELD] = labels
    return sample


# --------------------------------------------------------------------------- predictions


def prediction_field(model: dict) -> str:
    """``predictions_v<N>`` for a registry version, else ``predictions_<weights stem>``."""
    if model.get("version"):
        return f"predictions_v{model['version']}"
    return "predictions_" + re.sub(r"[^0-9A-Za-z_]", "_", Path(model["weights"]).stem)


def model_facts(weights: str | Path) -> dict:
    """Class names, task (detect | segment) and training image size of a weights file."""
    from detloop.model.yolo import load_model

    model = load_model(weights)
    train_args = (getattr(model, "ckpt", None) or {}).get("train_args") or {}
    return {
        "names": {int(k): str(v) for k, v in model.names.items()},
        "task": model.task,
        "imgsz": int(train_args.get("imgsz") or 640),
    }


def predict_images(
    weights: str | Path,
    images: Sequence[Path],
    predict_cfg: DictConfig,
    imgsz: int,
    task: str,
    cache: Path | None = None,
    cache_keep: int = 0,
) -> list[tuple]:
    """One prediction pass; per image ``(boxes_xyxy, cls, conf, masks or None)``.

    Detection models go through the gate's own :func:`detloop.evaluation.evaluator.predict` with the same
    settings (so FiftyOne's figures are the gate's), through the prediction cache when ``cache`` is a
    folder (:mod:`detloop.evaluation.predictions`: the gate's pass on the same images is reused);
    segmentation models through Ultralytics with ``retina_masks`` (masks at the original image size, so
    the crop to the box is exact).
    """
    from detloop.evaluation import predictions

    args = {
        "imgsz": imgsz,
        "batch": int(predict_cfg.batch),
        "device": predict_cfg.device,
        "conf": float(predict_cfg.conf),
        "iou": float(predict_cfg.iou),
        "max_det": int(predict_cfg.max_det),
    }
    if task != "segment":
        dets, _ = predictions.cached_predict(cache, weights, list(images), keep=cache_keep, **args)
        return [(d.boxes, d.cls, d.conf, None) for d in dets]
    from detloop.model.yolo import load_model

    model = load_model(weights)
    batch = args.pop("batch")
    out: list[tuple] = []
    for start in range(0, len(images), batch):
        chunk = [str(p) for p in images[start : start + batch]]
        by_path = {}
        for r in model.predict(source=chunk, stream=True, verbose=False, retina_masks=True, **args):
            masks = r.masks.data.cpu().numpy() if r.masks is not None else np.zeros((0, 1, 1))
            by_path[str(r.path)] = (
                r.boxes.xyxy.cpu().numpy(),
                r.boxes.cls.cpu().numpy().astype(np.int64),
                r.boxes.conf.cpu().numpy(),
                list(masks),
            )
        out += [by_path[str(Path(p).absolute())] for p in chunk]
    return out


def add_predictions(
    cfg: DictConfig, dataset, model: dict, view=None, *, min_conf: float | None = None, keep: dict | None = None
) -> str:
    """Predict with ``model`` (``{weights, version?, imgsz?}``) on the dataset (or ``view``) and store the
    detections in its prediction field with one batched write; returns the field name.

    ``min_conf``: only detections at or above it are stored (the prediction pass itself is the gate's,
    down to ``predict.conf``). ``keep`` (a dict) receives ``paths``, ``names`` and every detection of the
    pass (``detections``: per path ``(boxes_xyxy, cls, conf)``), for figures computed without the database.
    """
    field = prediction_field(model)
    facts = model_facts(model["weights"])
    imgsz = int(model.get("imgsz") or facts["imgsz"])
    samples = view if view is not None else dataset
    paths = samples.values("filepath")
    if not paths:
        return field
    sizes = zip(samples.values("metadata.width"), samples.values("metadata.height"), strict=True)
    from detloop.evaluation.predictions import cache_settings

    cache, cache_keep = cache_settings(cfg)
    found = predict_images(
        model["weights"], [Path(p) for p in paths], cfg.fiftyone.predict, imgsz, facts["task"], cache, cache_keep
    )
    if keep is not None:
        keep.update(paths=list(paths), names=facts["names"], detections=[(b, c, s) for b, c, s, _ in found])
    store_predictions(dataset, samples, field, paths, found, list(sizes), facts["names"], min_conf=min_conf)
    info = {k: str(v) for k, v in model.items() if v is not None}
    info["stored_conf"] = str(min_conf if min_conf is not None else cfg.fiftyone.predict.conf)
    dataset.info.setdefault("models", {})[field] = info
    dataset.save()
    log.info("%s: %s on %d samples (%s, imgsz %d)", dataset.name, field, len(paths), facts["task"], imgsz)
    return field


def store_predictions(
    dataset,
    samples,
    field: str,
    paths: Sequence[str],
    found: Sequence[tuple],
    sizes: Sequence[tuple[int, int]],
    names: dict[int, str],
    *,
    min_conf: float | None = None,
) -> None:
    """Store a prediction pass in ``field`` of ``samples`` (``dataset`` or a view of it) as ``fo.Detections``
    with one ``set_values`` keyed by file path.

    ``found`` holds per path ``(boxes_xyxy, cls, conf, masks or None)`` in pixels of an image of ``sizes``
    (width, height); ``min_conf``: only detections at or above it are stored. With :func:`fast_writes`
    and no masks, each sample's value is its :func:`detections_doc` (what ``fo.Detections`` stores),
    written unvalidated into the ``Detections`` field (a new field is declared by FiftyOne from the
    first sample's ``fo.Detections``); otherwise every value is a validated ``fo.Detections``.
    """
    import fiftyone as fo

    if not (len(paths) == len(found) == len(sizes)):
        raise ValueError(f"{len(paths)} paths, {len(found)} predictions and {len(sizes)} sizes")
    declared = dataset.get_field(field)
    fast = (
        fast_writes()
        and all(masks is None for *_, masks in found)
        and (
            declared is None
            or (isinstance(declared, fo.EmbeddedDocumentField) and declared.document_type is fo.Detections)
        )
    )
    values = {}
    for path, (b, c, s, masks), size in zip(paths, found, sizes, strict=True):
        if min_conf is not None:
            strong = np.flatnonzero(np.asarray(s) >= float(min_conf))
            b, c, s = np.asarray(b)[strong], np.asarray(c)[strong], np.asarray(s)[strong]
            masks = [masks[i] for i in strong] if masks is not None else None
        if fast and (declared is not None or values):
            values[path] = detections_doc(class_names(c, names), pixel_boxes_to_relative(b, size), s)
        else:
            values[path] = detections_from_pixels(b, c, s, size, names, masks)
    if not fast or not values:
        samples.set_values(field, values, key_field="filepath")
        return
    if declared is None:  # FiftyOne declares the new field from a Detections object, as set_values would
        first = next(iter(values))
        samples.set_values(field, {first: values.pop(first)}, key_field="filepath")
    if values:
        samples.set_values(field, values, key_field="filepath", validate=False)


def fill_review_labels(cfg: DictConfig, dataset, pred_field: str) -> int:
    """Inbox samples without reported labels get the model's predictions at the serving confidence as
    the labels to verify (``fiftyone.review.label_field``); returns how many were filled."""
    import fiftyone as fo
    from fiftyone import ViewField as F  # noqa: N817

    label_field = str(cfg.fiftyone.review.label_field)
    conf = float(cfg.gate.new_samples.conf)
    empty = dataset.exists(label_field, False).exists(pred_field)
    if not len(empty):
        return 0
    proposed = empty.filter_labels(pred_field, F("confidence") >= conf, only_matches=False)
    ids = proposed.values("id")
    values = [
        fo.Detections(
            detections=[
                fo.Detection(label=d.label, bounding_box=d.bounding_box, confidence=d.confidence, mask=d.mask)
                for d in (found.detections if found else [])
            ]
        )
        for found in proposed.values(pred_field)
    ]
    dataset.set_values(label_field, dict(zip(ids, values, strict=True)), key_field="id")
    return len(ids)
