"""Detection-rate matching: one-to-one, class-aware, thresholds honoured."""

import numpy as np
import pytest

from detloop.evaluation.metrics import detection_rate, found_objects, iou_matrix, yolo_labels_xyxy

GT = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], dtype=float)
GT_CLS = np.array([0, 1])


def test_iou_of_identical_and_disjoint_boxes():
    m = iou_matrix(GT, GT)
    assert m[0, 0] == pytest.approx(1.0) and m[0, 1] == 0.0


def test_a_prediction_of_the_wrong_class_finds_nothing_unless_class_agnostic():
    pred = GT[:1].copy()
    args = (GT, GT_CLS, pred, np.array([1]), np.array([0.9]))
    assert found_objects(*args).tolist() == [False, False]
    assert found_objects(*args, class_aware=False).tolist() == [True, False]


def test_one_prediction_finds_at_most_one_object():
    gt = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], dtype=float)
    found = found_objects(gt, np.array([0, 0]), gt[:1], np.array([0]), np.array([0.9]))
    assert found.sum() == 1


def test_low_confidence_and_low_overlap_do_not_count():
    shifted = np.array([[6, 6, 16, 16]], dtype=float)  # IoU with GT[0] = 16/184 < 0.5
    assert not found_objects(GT, GT_CLS, GT[:1], np.array([0]), np.array([0.1])).any()
    assert not found_objects(GT, GT_CLS, shifted, np.array([0]), np.array([0.9])).any()


def test_rate_overall_and_per_class():
    samples = [(GT, GT_CLS, GT[:1], np.array([0]), np.array([0.9]))]
    rate = detection_rate(samples, {0: "title", 1: "date"}).as_dict()
    assert rate["rate"] == 0.5
    assert rate["per_class"]["title"]["rate"] == 1.0 and rate["per_class"]["date"]["rate"] == 0.0


def test_yolo_label_file_to_pixel_boxes(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("2 0.5 0.5 0.2 0.4\n")
    boxes, cls = yolo_labels_xyxy(f, 100, 200)
    assert cls.tolist() == [2]
    assert boxes.tolist() == [[40.0, 60.0, 60.0, 140.0]]
    assert yolo_labels_xyxy(tmp_path / "missing.txt", 10, 10)[0].shape == (0, 4)
