"""FiftyOne helpers that need no database: converters, label text, the import-order guard, CLI refusals."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from detloop.cli.main import main as cli
from detloop.core.config import compose
from detloop.core.errors import BadInput
from detloop.fiftyone.load import check_sets, class_names, crop_mask, prediction_field, yolo_to_boxes
from detloop.fiftyone.review import yolo_text


def test_yolo_centre_boxes_become_top_left_boxes_without_touching_the_input():
    rows = np.array([[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.2, 0.2]])
    boxes = yolo_to_boxes(rows)
    assert boxes == pytest.approx(np.array([[0.4, 0.3, 0.2, 0.4], [0.0, 0.8, 0.2, 0.2]]))
    assert rows[0, 0] == 0.5 and yolo_to_boxes(np.zeros((0, 4))).shape == (0, 4)


def test_class_ids_map_to_names_and_unknown_ids_are_named_not_dropped():
    assert class_names(np.array([1, 0, 7]), {0: "title", 1: "date"}) == ["date", "title", "class_7"]


def test_a_full_image_mask_is_cropped_to_its_box_outward_and_clipped():
    mask = np.zeros((10, 20), dtype=np.float32)
    mask[2:5, 3:9] = 1.0
    sub = crop_mask(mask, [3.0, 2.0, 9.0, 5.0])
    assert sub.dtype == bool and sub.shape == (3, 6) and sub.all()
    assert crop_mask(mask, [2.5, 1.5, 9.2, 5.1]).shape == (5, 8)  # fractional edges round outward
    assert crop_mask(mask, [15.0, 8.0, 25.0, 14.0]).shape == (2, 5)  # clipped to the image
    assert crop_mask(mask, [19.9, 9.9, 19.9, 9.9]).shape == (1, 1)  # never empty


def test_prediction_fields_are_named_by_version_or_weights_file():
    assert prediction_field({"version": "7", "weights": "/x/best.pt"}) == "predictions_v7"
    assert prediction_field({"version": None, "weights": "/x/yolov8n-seg.pt"}) == "predictions_yolov8n_seg"


def _det(label, box, tags=()):
    return SimpleNamespace(label=label, bounding_box=box, tags=list(tags))


def test_verified_labels_become_yolo_text_without_the_boxes_tagged_wrong():
    dets = SimpleNamespace(
        detections=[
            _det("stamp", [0.1, 0.2, 0.3, 0.4]),
            _det("date", [0.5, 0.5, 0.1, 0.1], ["wrong"]),
            _det("title", [0.9, 0.9, 0.3, 0.3]),
        ]
    )
    text = yolo_text(dets, {"title": 0, "date": 1, "stamp": 4}, "wrong", "report-1")
    assert text.splitlines() == ["4 0.250000 0.400000 0.300000 0.400000", "0 0.950000 0.950000 0.100000 0.100000"]
    assert yolo_text(None, {}, "wrong", "report-1") == ""  # verified as empty: a background page
    with pytest.raises(BadInput, match="label 'cat' is not an anchor class"):
        yolo_text(SimpleNamespace(detections=[_det("cat", [0, 0, 0.1, 0.1])]), {"title": 0}, "wrong", "report-1")


def test_unknown_sets_are_refused_by_name():
    with pytest.raises(BadInput, match="unknown set"):
        check_sets(["anchor-test", "holdout"])


def test_the_fiftyone_group_predicts_like_the_gate():
    cfg = compose([])
    assert dict(cfg.fiftyone.predict) == dict(cfg.gate.eval)
    assert cfg.fiftyone.evaluate.max_preds == 100 and cfg.fiftyone.app.address == "127.0.0.1"


def test_app_review_commands_refuse_bad_input_before_any_work(overrides, capsys):
    assert cli(["review", "commit", *overrides]) == 2
    assert "--reviewer: required" in capsys.readouterr().err
    assert cli(["review", "open", "report-00001", *overrides]) == 2
    assert "takes no sample ids" in capsys.readouterr().err


@pytest.mark.integration
def test_fiftyone_refuses_to_load_after_mlflow_and_loads_before_it():
    after = "import mlflow\nfrom detloop.fiftyone.db import import_fiftyone\nimport_fiftyone()"
    done = subprocess.run([sys.executable, "-c", after], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "FiftyOneImportOrder" in done.stderr and "Import FiftyOne first" in done.stderr
    before = (
        "from detloop.fiftyone.db import import_fiftyone\nfo = import_fiftyone()\nimport mlflow\nprint(fo.__version__)"
    )
    done = subprocess.run([sys.executable, "-c", before], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "1.22.0", done.stderr[-2000:]
