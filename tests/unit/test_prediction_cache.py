"""A prediction pass is made once per weights, images and settings; anything that changes them predicts again."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detloop.core.errors import BadInput
from detloop.evaluation import evaluator, predictions

SETTINGS = {"imgsz": 64, "batch": 2, "conf": 0.0, "iou": 0.7, "max_det": 50, "device": "cpu"}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """An untrained yolov8n saved as a .pt (no download, no training)."""
    from detloop.model.yolo import ultralytics

    path = tmp_path_factory.mktemp("weights") / "untrained.pt"
    ultralytics().YOLO("yolov8n.yaml").save(str(path))
    return path


def image(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (48, 72, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def same(a: list[evaluator.Detections], b: list[evaluator.Detections]) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(x.boxes, y.boxes) and np.array_equal(x.cls, y.cls) and np.array_equal(x.conf, y.conf)
        for x, y in zip(a, b, strict=True)
    )


def counting(monkeypatch) -> list[int]:
    """Counts the real prediction passes :func:`cached_predict` makes."""
    calls: list[int] = []
    real = evaluator.predict

    def predict(weights, images, **settings):
        calls.append(len(images))
        return real(weights, images, **settings)

    monkeypatch.setattr(evaluator, "predict", predict)
    return calls


def test_a_second_pass_is_read_back_identical(tmp_path, weights, monkeypatch):
    images = [image(tmp_path / "images" / f"{i}.jpg", i) for i in range(3)]
    direct = evaluator.predict(weights, images, **SETTINGS)
    calls = counting(monkeypatch)
    first, hit1 = predictions.cached_predict(tmp_path / "cache", weights, images, **SETTINGS)
    second, hit2 = predictions.cached_predict(tmp_path / "cache", weights, images, **SETTINGS)
    assert (hit1, hit2) == (False, True) and calls == [3]
    assert same(first, direct) and same(second, direct)
    # weights with the same bytes under another path (a registry download to another folder) hit too
    copy = tmp_path / "elsewhere" / "model.pt"
    copy.parent.mkdir()
    shutil.copyfile(weights, copy)
    assert predictions.cached_predict(tmp_path / "cache", copy, images, **SETTINGS)[1] is True


def test_changed_images_order_or_settings_predict_again(tmp_path, weights, monkeypatch):
    images = [image(tmp_path / "images" / f"{i}.jpg", i) for i in range(3)]
    predictions.cached_predict(tmp_path / "cache", weights, images, **SETTINGS)
    calls = counting(monkeypatch)
    assert predictions.cached_predict(tmp_path / "cache", weights, images[::-1], **SETTINGS)[1] is False
    assert predictions.cached_predict(tmp_path / "cache", weights, images, **{**SETTINGS, "conf": 0.25})[1] is False
    assert predictions.cached_predict(tmp_path / "cache", weights, images, **{**SETTINGS, "imgsz": 96})[1] is False
    image(images[1], 99)  # the same file name with other pixels
    fresh, hit = predictions.cached_predict(tmp_path / "cache", weights, images, **SETTINGS)
    assert hit is False and calls == [3, 3, 3, 3]
    assert same(fresh, evaluator.predict(weights, images, **SETTINGS))


def test_a_damaged_entry_is_predicted_again_and_old_entries_are_pruned(tmp_path, weights, monkeypatch):
    images = [image(tmp_path / "images" / f"{i}.jpg", i) for i in range(2)]
    predictions.cached_predict(tmp_path / "cache", weights, images, **SETTINGS)
    (entry,) = (tmp_path / "cache").glob("*.npz")
    entry.write_bytes(b"not an npz")
    calls = counting(monkeypatch)
    dets, hit = predictions.cached_predict(tmp_path / "cache", weights, images, **SETTINGS)
    assert hit is False and calls == [2] and same(dets, evaluator.predict(weights, images, **SETTINGS))
    for size in (80, 96, 128):  # three more passes with keep=2: only the two most recent stay
        predictions.cached_predict(tmp_path / "cache", weights, images, keep=2, **{**SETTINGS, "imgsz": size})
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_a_missing_image_is_still_named(tmp_path, weights):
    with pytest.raises(BadInput, match="missing.jpg: image file not found"):
        predictions.cached_predict(tmp_path / "cache", weights, [tmp_path / "missing.jpg"], **SETTINGS)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())
