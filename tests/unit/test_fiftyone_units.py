"""FiftyOne helpers that need no database: converters, label text, CLI refusals and output; MLflow beside FiftyOne."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
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
    assert dict(cfg.fiftyone.predict) == dict(cfg.evaluate)
    assert cfg.fiftyone.evaluate.max_preds == 100 and cfg.fiftyone.app.address == "127.0.0.1"
    # `detloop inspect` stores what the served model shows: predictions at the serving confidence
    assert cfg.fiftyone.inspect.store_conf == cfg.gate.new_samples.conf == cfg.finetune.predict.conf


def test_app_review_commands_refuse_bad_input_before_any_work(overrides, capsys):
    assert cli(["review", "commit", *overrides]) == 2
    assert "--reviewer: required" in capsys.readouterr().err
    assert cli(["review", "open", "report-00001", *overrides]) == 2
    assert "takes no sample ids" in capsys.readouterr().err


def _fake_inspect(monkeypatch):
    """``detloop inspect`` with the work replaced: it prints a report and writes to descriptor 1 (as
    FiftyOne's log handler and the App server do) instead of loading anything."""
    from detloop.fiftyone import db, inspection

    def inspect_sets(cfg, sets, models, *, evaluate=True):
        print("classification report at confidence >= 0.25:")
        os.write(1, b"a FiftyOne log line on descriptor 1\n")
        return {"datasets": {"x-anchor-test": {"samples": 1, "fields": [], "figures": {}}}}, {}

    monkeypatch.setattr(inspection, "resolve_models", lambda cfg, specs: [])
    monkeypatch.setattr(inspection, "inspect_sets", inspect_sets)
    uri = "mongodb://127.0.0.1:1"
    monkeypatch.setattr(db, "connect", lambda cfg: SimpleNamespace(config=SimpleNamespace(database_uri=uri)))


def test_inspect_json_prints_the_json_alone_and_the_report_on_stderr(overrides, monkeypatch, capfd):
    _fake_inspect(monkeypatch)
    assert cli(["inspect", "--json", *overrides]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out) == {
        "database_uri": "mongodb://127.0.0.1:1",
        "datasets": {"x-anchor-test": {"samples": 1, "fields": [], "figures": {}}},
    }
    assert "classification report" in err and "log line on descriptor 1" in err
    # without --json the report is the output
    assert cli(["inspect", *overrides]) == 0
    out, _ = capfd.readouterr()
    assert "classification report" in out and "log line on descriptor 1" in out


@pytest.mark.integration
def test_fiftyone_imports_after_mlflow_in_one_process():
    """importlib_metadata is pinned below 8: MLflow loads it, and from 8 ``import fiftyone`` then fails
    (KeyError 'author' reading voxel51-eta's metadata)."""
    code = (
        "import sys\n"
        "import mlflow\n"
        "assert 'importlib_metadata' in sys.modules  # the backport that broke FiftyOne's import from 8.0\n"
        "import fiftyone\n"
        "import importlib_metadata\n"
        "from detloop.fiftyone import db, eval, inspection, load, review\n"
        "from detloop.cli.fiftyone_app import cmd_inspect\n"
        "print(mlflow.__version__, fiftyone.__version__, importlib_metadata.version('voxel51-eta'))"
    )
    env = {**os.environ, "FIFTYONE_DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [version("mlflow"), version("fiftyone"), version("voxel51-eta")]
