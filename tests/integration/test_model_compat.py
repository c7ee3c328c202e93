"""Detectors registered by the flat detloop 0.1 layout still load and predict after the move to subpackages.

A model logged by ``detloop.pyfunc.log_detector`` at 0.1 carries ``serving_model.py`` (which does
``from detloop.pyfunc import DetectorModel``) and a copy of the old package under ``code/detloop``.
MLflow 3.17 loads it by prepending ``<model>/code`` to ``sys.path`` (nothing is evicted from
``sys.modules``) and executing ``serving_model.py`` under a fresh module name. So:

* in a process that has imported detloop already (``detloop serve``, the gate, a notebook),
  ``detloop.pyfunc`` resolves inside the installed new package: the compatibility module must exist;
* in a bare process, ``detloop`` is imported from the model's own code copy: the old package answers.

The old package comes from tests/fixtures/detloop_0_1_src.tar.gz (no git history needed); the old model
is logged in a subprocess whose ``PYTHONPATH`` makes that package ``detloop``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import tarfile
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from tests.serving_helpers import detector_weights, page_bytes

pytestmark = pytest.mark.integration

OLD_SRC = Path(__file__).resolve().parents[1] / "fixtures" / "detloop_0_1_src.tar.gz"
NAME = "detloop-detector"
NAMES = ["stamp", "signature", "table"]
HOT = 1  # the untrained detector finds NAMES[HOT] everywhere (serving_helpers.detector_weights)
MODEL_CONFIG = {"conf": 0.25, "iou": 0.7, "imgsz": 64}
COLUMNS = ["row", "class_id", "class_name", "confidence", "x1", "y1", "x2", "y2", "xc", "yc", "w", "h"]
COMPARED = ["class_id", "confidence", "x1", "y1", "x2", "y2"]

LOG_OLD = """
import importlib.util, json, sys
import mlflow
import detloop
from detloop.pyfunc import log_detector

out, weights, artifacts, config, name = sys.argv[1:6]
client = mlflow.MlflowClient()
experiment = client.create_experiment("compat", artifact_location=artifacts)
with mlflow.start_run(experiment_id=experiment):
    info = log_detector(weights, model_config=json.loads(config), registered_model_name=name)
client.set_registered_model_alias(name, "production", info.registered_model_version)
facts = {
    "detloop": detloop.__file__,
    "has_model_subpackage": importlib.util.find_spec("detloop.model") is not None,
    "version": str(info.registered_model_version),
}
open(out, "w").write(json.dumps(facts))
"""

LOAD_FRESH = """
import json, sys
import mlflow.pyfunc
import pandas as pd

out, model_uri, dst, image = sys.argv[1:5]
preloaded = sorted(m for m in sys.modules if m == "detloop" or m.startswith("detloop."))
model = mlflow.pyfunc.load_model(model_uri, dst_path=dst)
predictions = model.predict(pd.DataFrame({"image": [open(image).read()]}))
python_model = type(model.unwrap_python_model())
facts = {
    "preloaded": preloaded,
    "sys_path0": sys.path[0],
    "detloop": sys.modules["detloop"].__file__,
    "model_class": f"{python_model.__module__}.{python_model.__name__}",
    "predictions": json.loads(predictions.to_json(orient="split", index=False)),
}
open(out, "w").write(json.dumps(facts))
"""


def run_python(script: str, args: list[str], cwd: Path, env: dict[str, str]) -> dict:
    """Run ``script`` in a new interpreter; return the JSON it wrote to the file named by its first argument."""
    path = cwd / "script.py"
    path.write_text(script)
    out = cwd / "facts.json"
    done = subprocess.run(
        [sys.executable, str(path), str(out), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


@contextmanager
def tracking(uri: str):
    """MLflow (tracking and registry) pointed at ``uri`` for the block, the previous URI afterwards."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def as_frame(split: dict) -> pd.DataFrame:
    return pd.DataFrame(split["data"], columns=split["columns"])


def canonical(frame: pd.DataFrame) -> np.ndarray:
    """The compared columns as floats, rows in a stable order (rounded keys: float noise must not reorder)."""
    values = frame[COMPARED].to_numpy(dtype=float)
    return values[np.lexsort(np.round(values, 2).T[::-1])]


def assert_same_detections(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    assert list(got.columns) == COLUMNS
    assert len(got) == len(expected) > 0
    assert set(got["class_name"]) == {NAMES[HOT]} and set(got["row"]) == {0}
    np.testing.assert_allclose(canonical(got), canonical(expected), atol=1e-3)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite registry whose ``production`` is v1, logged by the old layout, and ``candidate`` v2, by the new."""
    from PIL import Image

    from detloop.model.pyfunc import log_detector
    from detloop.model.yolo import ultralytics

    base = tmp_path_factory.mktemp("model-compat")
    with tarfile.open(OLD_SRC) as archive:
        archive.extractall(base / "old", filter="data")
    weights = detector_weights(base / "weights.pt", NAMES, hot_class=HOT)
    uri = f"sqlite:///{base / 'mlflow.db'}"

    # the old way: a process in which ``import detloop`` is the 0.1 package
    env = {**os.environ, "PYTHONPATH": str(base / "old" / "src"), "PYTHONDONTWRITEBYTECODE": "1"}
    env["MLFLOW_TRACKING_URI"] = uri
    work = base / "log-old"
    work.mkdir()
    artifacts = (base / "artifacts").as_uri()
    logged = run_python(LOG_OLD, [str(weights), artifacts, json.dumps(MODEL_CONFIG), NAME], work, env)
    assert Path(logged["detloop"]).is_relative_to(base / "old" / "src")
    assert not logged["has_model_subpackage"] and logged["version"] == "1"

    # the new way, in this process, as the next version of the same registered model
    with tracking(uri), mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("compat").experiment_id):
        info = log_detector(weights, MODEL_CONFIG, registered_model_name=NAME)
        mlflow.MlflowClient().set_registered_model_alias(NAME, "candidate", info.registered_model_version)
    assert str(info.registered_model_version) == "2"

    image = page_bytes(7)
    (base / "image.b64").write_text(base64.b64encode(image).decode())
    result = (
        ultralytics()
        .YOLO(str(weights))
        .predict(
            Image.open(io.BytesIO(image)).convert("RGB"),
            conf=MODEL_CONFIG["conf"],
            iou=MODEL_CONFIG["iou"],
            imgsz=MODEL_CONFIG["imgsz"],
            verbose=False,
        )[0]
    )
    boxes = result.boxes
    direct = pd.DataFrame(boxes.xyxy.cpu().numpy(), columns=["x1", "y1", "x2", "y2"])
    direct["class_id"] = boxes.cls.cpu().numpy().astype(int)
    direct["confidence"] = boxes.conf.cpu().numpy()
    return {"base": base, "uri": uri, "image": base / "image.b64", "direct": direct}


def fresh_load(store, alias: str, name: str) -> tuple[dict, Path]:
    """Load and predict ``models:/detloop-detector@<alias>`` in an interpreter that has not imported detloop."""
    work = store["base"] / f"fresh-{name}"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MLFLOW_TRACKING_URI"] = store["uri"]
    dst = work / "model"
    dst.mkdir()
    facts = run_python(LOAD_FRESH, [f"models:/{NAME}@{alias}", str(dst), str(store["image"])], work, env)
    assert facts["preloaded"] == []
    assert facts["sys_path0"] == str(dst / "code")  # MLflow's code_paths mechanism put the model's code first
    return facts, dst


def test_old_model_loads_where_the_new_package_is_imported(store, monkeypatch, tmp_path):
    import detloop
    from detloop.model.pyfunc import DetectorModel

    monkeypatch.setattr(sys, "path", list(sys.path))  # MLflow prepends the model's code dir; undone after
    dst = tmp_path / "model"
    dst.mkdir()
    with tracking(store["uri"]):
        model = mlflow.pyfunc.load_model(f"models:/{NAME}@production", dst_path=str(dst))
    # the registered production version is the old layout: its own code names detloop.pyfunc
    assert "from detloop.pyfunc import DetectorModel" in (dst / "serving_model.py").read_text()
    assert (dst / "code" / "detloop" / "serving_model.py").is_file()
    assert not (dst / "code" / "detloop" / "model").exists()
    # it went through the real code_paths path, yet the imported (new) package answered, via the shim
    assert sys.path[0] == str(dst / "code")
    assert sys.modules["detloop"] is detloop and not Path(detloop.__file__).is_relative_to(dst)
    assert type(model.unwrap_python_model()) is DetectorModel

    predictions = model.predict(pd.DataFrame({"image": [store["image"].read_text()]}))
    assert_same_detections(predictions, store["direct"])


def test_old_model_loads_in_a_fresh_process(store):
    facts, dst = fresh_load(store, "production", "old")
    # nothing imported detloop first, so the model's own 0.1 code copy is the package that answers
    assert Path(facts["detloop"]).is_relative_to(dst / "code")
    assert facts["model_class"] == "detloop.pyfunc.DetectorModel"
    assert_same_detections(as_frame(facts["predictions"]), store["direct"])


def test_new_model_loads_in_a_fresh_process(store):
    facts, dst = fresh_load(store, "candidate", "new")
    assert Path(facts["detloop"]).is_relative_to(dst / "code")
    assert (dst / "code" / "detloop" / "model" / "pyfunc.py").is_file()
    assert facts["model_class"] == "detloop.model.pyfunc.DetectorModel"
    assert_same_detections(as_frame(facts["predictions"]), store["direct"])


LOAD_OLD_THEN_NEW = """
import json, sys
import mlflow.pyfunc
import pandas as pd

out, old_uri, new_uri, work, image = sys.argv[1:6]
facts = {}
for key, uri in (("old", old_uri), ("new", new_uri)):
    model = mlflow.pyfunc.load_model(uri, dst_path=f"{work}/{key}")
    predictions = model.predict(pd.DataFrame({"image": [open(image).read()]}))
    facts[key] = json.loads(predictions.to_json(orient="split", index=False))
open(out, "w").write(json.dumps(facts))
"""


def test_one_bare_process_loads_an_old_then_a_new_version(store):
    # given a process that never imported detloop: the first model's code copy becomes `detloop`
    work = store["base"] / "fresh-both"
    work.mkdir()
    (work / "old").mkdir()
    (work / "new").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MLFLOW_TRACKING_URI"] = store["uri"]
    uris = [f"models:/{NAME}@production", f"models:/{NAME}@candidate"]
    facts = run_python(LOAD_OLD_THEN_NEW, [*uris, str(work), str(store["image"])], work, env)
    # then the new version still loads (its serving_model names the stable detloop.pyfunc) and predicts alike
    assert_same_detections(as_frame(facts["old"]), store["direct"])
    assert_same_detections(as_frame(facts["new"]), store["direct"])
