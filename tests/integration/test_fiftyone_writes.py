"""The stored-document writes of ``detloop.fiftyone.load`` against FiftyOne's object path, on the real mongod.

Every set kind (anchor split, pool with manifest fields, inbox with and without reported labels) is loaded
twice into datasets of their own, once with :func:`load.fast_writes` and once through ``fo.Sample`` /
``fo.Detections`` objects and ``add_samples`` / validated ``set_values``; then grown by new images and
given predictions the same two ways. Read back through FiftyOne's API, the two must hold the same
schema, samples in the same order, and every field of every label equal (ids and times apart).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tests.integration.conftest import own_mongod

from detloop.core.config import compose
from detloop.fiftyone import load as fo_load
from detloop.fiftyone.db import connect

pytestmark = pytest.mark.integration

NAMES = {0: "title", 1: "date", 2: "stamp"}
SIZES = ((64, 80), (80, 64), (96, 96))
VOLATILE = {"_id", "id", "created_at", "last_modified_at", "_rand", "_dataset_id"}


def _page(path: Path, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, 200).save(path)


def _labels(path: Path, rng: np.random.Generator, count: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        f"{int(rng.integers(0, 4))} {rng.uniform(0.2, 0.8):.6f} {rng.uniform(0.2, 0.8):.6f} "
        f"{rng.uniform(0.05, 0.3):.6f} {rng.uniform(0.05, 0.3):.6f}\n"
        for _ in range(count)
    ]  # class 3 has no name: stored as class_3
    path.write_text("".join(rows))


def write_sets(data: Path, start: int, count: int, seed: int) -> None:
    """Images ``start..start+count`` of anchor test, pool and inbox (labels, manifests appended)."""
    rng = np.random.default_rng(seed)
    for i in range(start, start + count):
        size = SIZES[i % len(SIZES)]
        _page(data / f"anchor/images/test/a{i:03d}.jpg", size)
        if i % 7 != 3:  # some anchor images have no label file: empty ground truth
            _labels(data / f"anchor/labels/test/a{i:03d}.txt", rng, int(rng.integers(0, 5)))
        _page(data / f"pool/images/p{i:03d}.jpg", size)
        _labels(data / f"pool/labels/p{i:03d}.txt", rng, int(rng.integers(1, 4)))
        row = {"id": f"p{i:03d}", "split": "train" if i % 3 else "val", "source": "report", "reviewer": None}
        if i >= 5:  # fields that the first samples lack
            row.update(reviewer="ana", verified_at=f"2026-01-{1 + i % 28:02d}", labels_from="v2")
        with (data / "pool/manifest.jsonl").open("a") as out:
            out.write(json.dumps(row) + "\n")
        _page(data / f"inbox/images/r{i:03d}.jpg", size)
        if i % 2:  # only some reports come with labels
            _labels(data / f"inbox/labels/r{i:03d}.txt", rng, 2)
        with (data / "inbox/manifest.jsonl").open("a") as out:
            out.write(json.dumps({"id": f"r{i:03d}", "reported_at": f"2026-02-{1 + i:02d}", "note": None}) + "\n")


def predictions(count: int, seed: int) -> list[tuple]:
    """Per image ``(boxes_xyxy, cls, conf, None)`` in pixels, float32 as a model gives them; some empty."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        n = 0 if i % 5 == 0 else int(rng.integers(1, 6))
        x0 = rng.uniform(0, 40, (n, 2))
        boxes = np.column_stack([x0, x0 + rng.uniform(2, 30, (n, 2))]).astype(np.float32)
        out.append((boxes, rng.integers(0, 4, n), rng.uniform(0.01, 1, n).astype(np.float32), None))
    return out


def schema_of(fields) -> dict:
    """Field name -> (field type, element type, document type, declared subfields, the document's fields)."""
    out = {}
    for name, field in fields.items():
        inner = getattr(field, "field", None)
        embedded = field if hasattr(field, "get_field_schema") else inner
        declared = getattr(field, "fields", None) or getattr(inner, "fields", None) or []
        out[name] = (
            type(field).__name__,
            type(inner).__name__ if inner is not None else None,
            getattr(getattr(embedded, "document_type", None), "__name__", None),
            schema_of({f.name: f for f in declared}),
            schema_of(embedded.get_field_schema()) if hasattr(embedded, "get_field_schema") else {},
        )
    return out


def without_volatile(value):
    if isinstance(value, dict):
        return {k: without_volatile(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [without_volatile(v) for v in value]
    return value


def read_back(dataset) -> tuple[dict, list[dict], list[str]]:
    """Schema, every sample as FiftyOne serializes it (ids and times apart), and every label id."""
    samples, label_ids = [], []
    fields = [f for f in dataset.get_field_schema() if f not in VOLATILE]
    for sample in dataset.iter_samples():
        entry = {}
        for field in fields:
            value = sample[field]
            entry[field] = without_volatile(value.to_dict() if hasattr(value, "to_dict") else value)
            if hasattr(value, "detections"):
                label_ids += [d.id for d in value.detections]
                for det in value.detections:  # each label through its attributes, not only its document
                    entry.setdefault(f"{field}.read", []).append(
                        (det.label, list(det.bounding_box), det.confidence, det.mask, det.index, det.tags)
                    )
        assert 0.999 <= sample["_rand"] < 1.0 and sample.created_at is not None and sample.last_modified_at
        samples.append(entry)
    return schema_of(dataset.get_field_schema(include_private=True)), samples, label_ids


def load_both_ways(tmp_path: Path, uri: str, monkeypatch, set_name: str, grow: bool):
    """The set loaded (and grown, and given predictions) fast and through objects; both datasets."""
    data = tmp_path / "data"
    write_sets(data, 0, 12, seed=1)
    out = {}
    for fast in (True, False):
        monkeypatch.setattr(fo_load, "fast_writes", lambda fast=fast: fast)
        cfg = compose(
            [
                f"paths.data={data}",
                f"paths.build={tmp_path / 'build'}",
                f"fiftyone.database.uri={uri}",
                f"fiftyone.dataset_prefix={'fast' if fast else 'objects'}-{set_name}-{int(grow)}",
                "fiftyone.batch_size=4",
            ]
        )
        connect(cfg)
        dataset = fo_load.load_set(cfg, set_name, NAMES)
        out[fast] = (cfg, dataset)
    if grow:  # both datasets exist: new images arrive, each dataset is brought up to date
        write_sets(data, 12, 9, seed=2)
        for fast, (cfg, _) in out.items():
            monkeypatch.setattr(fo_load, "fast_writes", lambda fast=fast: fast)
            out[fast] = (cfg, fo_load.load_set(cfg, set_name, NAMES))
    for fast, (_, dataset) in out.items():
        monkeypatch.setattr(fo_load, "fast_writes", lambda fast=fast: fast)
        paths = dataset.values("filepath")
        sizes = list(zip(dataset.values("metadata.width"), dataset.values("metadata.height"), strict=True))
        found = predictions(len(paths), seed=3)
        fo_load.store_predictions(dataset, dataset, "predictions_all", paths, found, sizes, NAMES)
        fo_load.store_predictions(dataset, dataset, "predictions_served", paths, found, sizes, NAMES, min_conf=0.25)
    return out[True][1], out[False][1]


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    with own_mongod(tmp_path_factory.mktemp("fiftyone-db")) as uri:
        yield uri


@pytest.mark.parametrize(("set_name", "grow"), [("anchor-test", False), ("pool", True), ("inbox", True)])
def test_fast_writes_store_what_fiftyone_objects_store(database, tmp_path, monkeypatch, set_name, grow):
    assert fo_load.fast_writes(), f"fast writes are pinned to FiftyOne {fo_load.FAST_WRITES_VERSION}"
    fast, objects = load_both_ways(tmp_path, database, monkeypatch, set_name, grow)
    fast_schema, fast_samples, fast_ids = read_back(fast)
    schema, samples, ids = read_back(objects)
    assert len(fast) == len(objects) == (21 if grow else 12)
    assert list(fast_schema) == list(schema) and fast_schema == schema
    for mine, theirs in zip(fast_samples, samples, strict=True):
        assert mine == theirs
    labelled = sum(len(s.get("ground_truth.read", [])) for s in samples)
    assert labelled and sum(len(s.get("predictions_all.read", [])) for s in samples)
    assert len(fast_ids) == len(set(fast_ids)) == len(ids)  # every label its own id
    if set_name == "inbox":  # the proposed copy is its own labels
        assert not set(fast.values("reported_labels.detections.id", unwind=True)) & set(
            fast.values("ground_truth.detections.id", unwind=True)
        )
    if set_name != "inbox":  # FiftyOne's evaluation, views and patches on both
        results = []
        for dataset in (fast, objects):
            res = dataset.evaluate_detections(
                "predictions_all", gt_field="ground_truth", eval_key="ev", compute_mAP=True
            )
            patches = dataset.to_evaluation_patches("ev")
            results.append(
                (
                    res.mAP(),
                    patches.count_values("type"),
                    dataset.sum("ev_tp"),
                    dataset.sum("ev_fp"),
                    dataset.sum("ev_fn"),
                )
            )
            assert len(dataset.to_patches("predictions_served")) == dataset.count("predictions_served.detections")
        assert results[0] == results[1]
