"""The gate's evaluator: COCO mAP equal to pycocotools, ground truth from YOLO labels, one predict pass."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detloop.core.errors import BadInput
from detloop.evaluation import evaluator
from detloop.evaluation.evaluator import (
    NO_GT,
    Detections,
    GroundTruth,
    coco_map,
    evaluate_predictions,
    evaluate_set,
    label_path,
    load_ground_truth,
    predict,
)

CLASSES = [0, 1, 2, 3, 5]  # 3: objects but never predicted; 5: predicted but no objects; 9: not evaluated


# ------------------------------------------------------------------------------ pycocotools reference
def synthetic_set(seed: int, n_images: int = 40, ties: bool = False) -> tuple[list[GroundTruth], list[Detections]]:
    """Random objects and predictions with the awkward cases COCOeval handles: empty images, duplicate
    objects, classes without objects or without predictions, >100 predictions of one class in an image,
    degenerate (negative-width) boxes and, with ``ties``, many equal scores."""
    rng = np.random.default_rng(seed)
    gts, dets = [], []
    for i in range(n_images):
        n = int(rng.integers(0, 8)) if i % 7 else 0
        xy, wh = rng.uniform(0, 400, (n, 2)), rng.uniform(5, 120, (n, 2))
        boxes, cls = np.concatenate([xy, xy + wh], 1), rng.choice([0, 1, 2], n)
        if i % 5 == 1 and n:  # the same object labelled twice: equal IoUs, tie broken by label order
            boxes, cls = np.concatenate([boxes, boxes[:1]]), np.append(cls, cls[0])
        if i % 4 == 2:
            boxes, cls = np.concatenate([boxes, [[10, 10, 60, 50]]]), np.append(cls, 3)
        pred_boxes, pred_cls, conf = [], [], []
        for box, c in zip(boxes, cls, strict=True):
            for _ in range(int(rng.integers(0, 4)) if c != 3 else 0):
                pred_boxes.append(box + rng.normal(0, 0.08 * (box[2:] - box[:2]).mean(), 4))
                pred_cls.append(c if rng.random() > 0.1 else rng.choice([0, 1, 2]))
                conf.append(rng.uniform(0.05, 1))
        for _ in range(250 if i == 3 else int(rng.integers(0, 30)) if i % 7 else 0):
            xy, wh = rng.uniform(0, 400, 2), rng.uniform(5, 120, 2)
            pred_boxes.append(np.concatenate([xy, xy + wh]))
            pred_cls.append(1 if i == 3 else rng.choice([0, 1, 2, 5, 9]))
            conf.append(rng.uniform(0.001, 0.6))
        conf = np.round(conf, 1) if ties else np.array(conf)
        gts.append(GroundTruth(boxes, cls))
        dets.append(Detections(np.array(pred_boxes).reshape(-1, 4), pred_cls, conf))
    return gts, dets


def xywh(box: list[float]) -> list[float]:
    return [box[0], box[1], box[2] - box[0], box[3] - box[1]]


def pycocotools_map(gts: list[GroundTruth], dets: list[Detections], class_ids: list[int]) -> dict:
    """The same figures from pycocotools COCOeval (COCO dicts: xywh boxes, area w*h, ids from 1)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations, results = [], [], []
    for image_id, (gt, det) in enumerate(zip(gts, dets, strict=True), start=1):
        images.append({"id": image_id, "width": 640, "height": 640})
        for box, c in zip(gt.boxes.tolist(), gt.cls.tolist(), strict=True):
            b = xywh(box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": c,
                    "bbox": b,
                    "area": b[2] * b[3],
                    "iscrowd": 0,
                }
            )
        for box, c, score in zip(det.boxes.tolist(), det.cls.tolist(), det.conf.tolist(), strict=True):
            results.append({"image_id": image_id, "category_id": c, "bbox": xywh(box), "score": score})
    coco_gt = COCO()
    coco_gt.dataset = {"images": images, "annotations": annotations, "categories": [{"id": c} for c in class_ids]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
        run = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
        run.evaluate()
        run.accumulate()
        run.summarize()
    precision = run.eval["precision"][:, :, :, 0, -1]  # area all, maxDets 100
    per_class = {}
    for k, c in enumerate(run.params.catIds):
        p = precision[:, :, k]
        per_class[c] = (p[0].mean(), p.mean()) if (p > -1).all() else (NO_GT, NO_GT)
    return {"map50": run.stats[1], "map50_95": run.stats[0], "per_class": per_class}


@pytest.mark.parametrize("seed", range(6))
def test_coco_map_equals_pycocotools(seed):
    gts, dets = synthetic_set(seed, ties=seed % 2 == 1)
    ours = coco_map(gts, dets, CLASSES)
    ref = pycocotools_map(gts, dets, CLASSES)
    assert ours["map50"] == pytest.approx(ref["map50"], abs=1e-9)
    assert ours["map50_95"] == pytest.approx(ref["map50_95"], abs=1e-9)
    for c in CLASSES:
        assert ours["per_class"][c]["ap50"] == pytest.approx(ref["per_class"][c][0], abs=1e-9)
        assert ours["per_class"][c]["ap50_95"] == pytest.approx(ref["per_class"][c][1], abs=1e-9)


def test_classes_without_objects_are_left_out_and_unpredicted_classes_score_zero():
    gts, dets = synthetic_set(0)
    result = coco_map(gts, dets, CLASSES)
    assert result["per_class"][5] == {"ap50": NO_GT, "ap50_95": NO_GT, "n_gt": 0}
    assert result["per_class"][3]["ap50"] == 0.0 and result["per_class"][3]["n_gt"] > 0
    assert 9 not in result["per_class"]
    evaluated = [v["ap50_95"] for v in result["per_class"].values() if v["n_gt"]]
    assert result["map50_95"] == pytest.approx(np.mean(evaluated))


def test_matching_in_small_memory_chunks_gives_the_same_result(monkeypatch):
    gts, dets = synthetic_set(2, n_images=60)
    expected = coco_map(gts, dets, CLASSES)
    monkeypatch.setattr(evaluator, "CHUNK_ELEMENTS", 1)
    assert coco_map(gts, dets, CLASSES) == expected


def test_perfect_missing_and_empty_predictions():
    gt = [GroundTruth([[0, 0, 10, 10], [20, 20, 40, 40]], [0, 1]), GroundTruth(np.zeros((0, 4)), [])]
    perfect = [Detections(gt[0].boxes, gt[0].cls, [0.9, 0.8]), Detections(np.zeros((0, 4)), [], [])]
    assert coco_map(gt, perfect, [0, 1])["map50_95"] == pytest.approx(1.0)  # pycocotools: 1 - 2e-16
    nothing = [Detections(np.zeros((0, 4)), [], [])] * 2
    assert coco_map(gt, nothing, [0, 1]) == {
        "map50": 0.0,
        "map50_95": 0.0,
        "per_class": {0: {"ap50": 0.0, "ap50_95": 0.0, "n_gt": 1}, 1: {"ap50": 0.0, "ap50_95": 0.0, "n_gt": 1}},
    }
    assert coco_map([gt[1]], [nothing[0]], [0])["map50"] == NO_GT
    with pytest.raises(ValueError, match="1 ground-truth images but 2"):
        coco_map(gt[:1], nothing, [0])


# --------------------------------------------------------------------------------- ground truth files
def write_image(path: Path, size: tuple[int, int] = (80, 60), exif_orientation: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, (255, 255, 255))
    exif = Image.Exif()
    if exif_orientation:
        exif[0x0112] = exif_orientation
    image.save(path, exif=exif)
    return path


def test_label_path_follows_the_ultralytics_rule():
    assert label_path("/d/images/x/images/a.b.jpg") == Path("/d/images/x/labels/a.b.txt")


def test_ground_truth_in_pixels_missing_label_means_no_objects(tmp_path):
    a = write_image(tmp_path / "images" / "a.jpg", (80, 60))
    b = write_image(tmp_path / "images" / "b.jpg")
    rotated = write_image(tmp_path / "images" / "r.jpg", (80, 60), exif_orientation=6)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.txt").write_text("2 0.5 0.5 0.25 0.5\n\n")
    (tmp_path / "labels" / "r.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    gt_a, gt_b, gt_r = load_ground_truth([a, b, rotated])
    assert gt_a.cls.tolist() == [2] and gt_a.boxes.tolist() == [[30.0, 15.0, 50.0, 45.0]]
    assert gt_b.boxes.shape == (0, 4) and gt_b.cls.shape == (0,)
    assert gt_r.boxes.tolist() == [[15.0, 20.0, 45.0, 60.0]]  # EXIF 6: OpenCV loads it as 60x80


def test_unreadable_images_and_malformed_labels_are_all_reported(tmp_path):
    good = write_image(tmp_path / "images" / "good.jpg")
    broken = tmp_path / "images" / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "good.txt").write_text("0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2\n7 0.5 0.5 0.2 0.2\n")
    with pytest.raises(BadInput) as err:
        load_ground_truth([good, broken], num_classes=6)
    text = str(err.value)
    assert f"{broken}: cannot be read as an image" in text
    assert f"{tmp_path / 'labels' / 'good.txt'}:2: 4 fields" in text
    assert f"{tmp_path / 'labels' / 'good.txt'}:3: class id 7" in text


# ------------------------------------------------------------------------------------------ evaluation
def test_detection_rate_and_map_from_precomputed_predictions():
    gts = [GroundTruth([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 1])]
    dets = [Detections([[0, 0, 10, 10], [20, 20, 30, 30], [20, 20, 30, 30]], [0, 0, 1], [0.9, 0.8, 0.1])]
    result = evaluate_predictions(gts, dets, {0: "title", 1: "date"})
    assert (result["images"], result["objects"], result["detections"]) == (1, 2, 3)
    assert result["detection_rate"]["rate"] == 0.5  # the date is only found below the serving confidence
    assert result["detection_rate_any_class"]["rate"] == 1.0
    assert result["per_class"]["date"]["ap50"] == pytest.approx(1.0) and result["map50"] == pytest.approx(1.0)
    assert set(result["timings"]) == {"metrics_s"}
    with pytest.raises(BadInput, match=r"class ids \[1\]"):
        evaluate_predictions(gts, dets, {0: "title"})


@pytest.fixture(scope="module")
def untrained_weights(tmp_path_factory) -> Path:
    """An untrained yolov8n saved as a .pt (no download, no training)."""
    from detloop.model.yolo import ultralytics

    path = tmp_path_factory.mktemp("weights") / "untrained.pt"
    ultralytics().YOLO("yolov8n.yaml").save(str(path))
    return path


def test_predict_keeps_the_input_order_and_pixel_coordinates(tmp_path, untrained_weights):
    wide = write_image(tmp_path / "images" / "b_wide.jpg", (200, 40))
    tall = write_image(tmp_path / "images" / "a_tall.jpg", (40, 200))
    images = [wide, tall, wide, tall]  # Ultralytics sorts each source list; results come back in this order
    dets = predict(untrained_weights, images, imgsz=64, batch=2, conf=0.0, max_det=50, device="cpu")
    assert len(dets) == 4 and all(len(d.conf) for d in dets)
    for det, (w, h) in zip(dets, [(200, 40), (40, 200)] * 2, strict=True):
        assert det.boxes[:, [0, 2]].max() <= w + 1e-3 and det.boxes[:, [1, 3]].max() <= h + 1e-3
    assert np.array_equal(dets[0].boxes, dets[2].boxes) and np.array_equal(dets[1].conf, dets[3].conf)


def test_predict_names_an_image_it_cannot_decode(tmp_path, untrained_weights):
    bad = tmp_path / "images" / "bad.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(BadInput, match="bad.jpg: cannot be read as an image"):
        predict(untrained_weights, [write_image(tmp_path / "images" / "ok.jpg"), bad], imgsz=64, device="cpu")
    with pytest.raises(BadInput, match="missing.jpg: image file not found"):
        predict(untrained_weights, [tmp_path / "missing.jpg"], imgsz=64, device="cpu")


def test_evaluate_set_runs_one_pass_and_reports_timings(tmp_path, untrained_weights):
    images = [write_image(tmp_path / "images" / f"{i}.jpg") for i in range(3)]
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "0.txt").write_text("1 0.5 0.5 0.5 0.5\n")
    result = evaluate_set(untrained_weights, images, {i: f"c{i}" for i in range(80)}, imgsz=64, batch=2, device="cpu")
    assert (result["images"], result["objects"]) == (3, 1)
    assert set(result["timings"]) == {"ground_truth_s", "inference_s", "metrics_s"}
    assert 0.0 <= result["map50"] <= 1.0 and result["per_class"]["c1"]["n_gt"] == 1
