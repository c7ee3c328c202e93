"""Stage `base` against the real MLflow (SQLite) store, with a 1-epoch tiny training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from tests.conftest import tiny_overrides

from detloop.base import run as run_base
from detloop.core.config import compose
from detloop.core.errors import BadInput, TrackingUnavailable
from detloop.evaluate import run as run_evaluate
from detloop.evaluation.measure import evaluate_model
from detloop.tracking import registry

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    """Given a tiny anchor, when the base stage runs once in a fresh store."""
    base = tmp_path_factory.mktemp("base-stage")
    overrides = tiny_overrides(base)
    overrides[1] = f"paths.data={tiny_data}"
    cfg = compose(overrides)
    cwd_before = set(Path.cwd().iterdir())
    result = run_base(cfg)
    return cfg, result, base, cwd_before


def test_base_registers_a_version_holding_base_and_production(trained):
    cfg, result, _, _ = trained
    rows = registry.versions(cfg)
    assert [r["version"] for r in rows] == [result["version"]] == ["1"]
    assert rows[0]["aliases"] == ["base", "production"]
    tags = rows[0]["tags"]
    assert tags["kind"] == "base"
    assert tags["decision"] == "bootstrap"
    assert tags["run_id"] == result["run_id"]
    client = mlflow.MlflowClient()
    assert client.get_model_version(cfg.mlflow.registered_model, "1").description.startswith("base model:")
    assert "`production` = the served model" in client.get_registered_model(cfg.mlflow.registered_model).description


def test_version_and_run_carry_lineage_and_device(trained):
    cfg, result, _, _ = trained
    tags = registry.versions(cfg)[0]["tags"]
    assert len(tags["lineage.git_commit"].removesuffix("-dirty")) == 40
    assert len(tags["lineage.config_hash"]) == 16
    assert "lineage.data_dvc_md5" in tags and "lineage.anchor_manifest_sha256" in tags
    run = mlflow.get_run(result["run_id"])
    assert run.data.tags["stage"] == "base"
    assert run.data.tags["device.type"] in {"cpu", "cuda"}
    assert run.data.tags["device.name"]
    assert run.data.tags["device.memory_gb"]


def test_run_logs_every_config_value_per_epoch_metrics_and_plots(trained):
    cfg, result, _, _ = trained
    run = mlflow.get_run(result["run_id"])
    assert run.data.params["base.train.epochs"] == str(cfg.base.train.epochs)
    assert run.data.params["base.train.lr0"] == str(cfg.base.train.lr0)
    assert run.data.params["base.model"] == "yolov8n.yaml"
    assert int(run.data.params["data.anchor_train"]) == cfg.demo.anchor.train
    history = mlflow.MlflowClient().get_metric_history(result["run_id"], "train/box_loss")
    assert [m.step for m in history] == list(range(1, cfg.base.train.epochs + 1))
    assert "metrics/mAP50B" in run.data.metrics
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(result["run_id"], "training")}
    assert "training/results.csv" in artifacts


def test_audit_trail_records_both_bootstrap_moves(trained):
    cfg, _, _, _ = trained
    moves = registry.history(cfg)
    assert [(m["alias"], m["from_version"], m["to_version"]) for m in moves] == [
        ("base", "", "1"),
        ("production", "", "1"),
    ]
    assert moves[1]["decision"] == "bootstrap"


def test_production_alias_loads_as_pyfunc_and_predicts_the_contract(trained, tiny_data):
    cfg, _, _, _ = trained
    model = mlflow.pyfunc.load_model(f"models:/{cfg.mlflow.registered_model}@production")
    image = sorted((tiny_data / "anchor" / "images" / "test").iterdir())[0]
    import base64

    encoded = base64.b64encode(image.read_bytes()).decode()
    out = model.predict(pd.DataFrame({"image": [str(image), encoded]}))
    assert list(out.columns) == [
        "row",
        "class_id",
        "class_name",
        "confidence",
        "x1",
        "y1",
        "x2",
        "y2",
        "xc",
        "yc",
        "w",
        "h",
    ]
    assert set(out["row"]) <= {0, 1}
    with pytest.raises(Exception, match="row 0"):
        model.predict(pd.DataFrame({"image": ["not an image"]}))


def test_stage_outputs_name_the_registered_version(trained):
    cfg, result, base, _ = trained
    written = json.loads((base / "build" / "base" / "model.json").read_text())
    assert written["model_uri"] == f"models:/{cfg.mlflow.registered_model}/1"
    assert (base / "build" / "base" / "metrics.json").is_file()


def test_nothing_writes_a_tracking_store_of_its_own(trained):
    _, _, base, cwd_before = trained
    created = {p.name for p in set(Path.cwd().iterdir()) - cwd_before}
    assert not created & {"mlflow.db", "mlruns", "runs"}, created
    assert (base / "mlruns" / "mlflow.db").is_file()


def test_evaluate_writes_metrics_and_tags_the_version(trained):
    cfg, result, base, _ = trained
    metrics = run_evaluate(cfg)
    assert 0.0 <= metrics["map50"] <= 1.0
    written = json.loads((base / "build" / "evaluate" / "metrics.json").read_text())
    assert written["model_version"] == "1"
    assert set(written) >= {"map50", "map50_95", "detection_rate", "per_class"}
    assert set(written["per_class"].get("title", {})) <= {"ap50", "ap50_95", "detection_rate"}
    tags = registry.versions(cfg)[0]["tags"]
    assert tags["eval.anchor_test.map50"] == f"{metrics['map50']:.4f}"
    run = mlflow.get_run(result["run_id"])
    assert "anchor_test/map50" in run.data.metrics
    # every figure of the evaluate run is on the training run too, at step 0 (one batch)
    evaluated = mlflow.last_active_run().data.metrics
    figures = {k: v for k, v in evaluated.items() if k.startswith("anchor_test/")}
    assert len(figures) > 3
    assert {k: run.data.metrics[k] for k in figures} == figures
    history = mlflow.MlflowClient().get_metric_history(result["run_id"], "anchor_test/map50")
    assert history[-1].step == 0


EVALUATE_AS_DVC_RUNS_IT = """
import atexit, runpy, sys
atexit.register(lambda: print("loaded:", ",".join(m for m in ("torch", "ultralytics") if m in sys.modules)))
sys.argv = ["detloop.evaluate", *sys.argv[1:]]
runpy.run_module("detloop.evaluate", run_name="__main__")
"""


def test_evaluate_reuses_the_base_stages_pass_without_loading_torch(trained, tmp_path):
    """The base stage keeps the new version's anchor-test pass; `evaluate`, as its own process, measures
    from it (no torch, no Ultralytics) and gets exactly the figures of a pass made from scratch."""
    cfg, result, base, _ = trained
    overrides = tiny_overrides(base)
    overrides[1] = f"paths.data={cfg.paths.data}"  # the shared tiny data, as the fixture composed it
    entries = sorted((base / "build" / "cache" / "predictions").glob("*.npz"))
    assert entries, "the base stage kept no prediction pass"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    done = subprocess.run(
        [sys.executable, "-c", EVALUATE_AS_DVC_RUNS_IT, *overrides], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "loaded:", done.stdout[-500:]
    written = json.loads((base / "build" / "evaluate" / "metrics.json").read_text())
    fresh = evaluate_model(compose([*overrides, "evaluate.cache.keep=0"]), result["model_uri"])
    assert {k: written[k] for k in fresh} == fresh
    run = mlflow.search_runs(
        experiment_names=[cfg.mlflow.experiment], filter_string="tags.stage = 'evaluate'", output_format="list"
    )[0]
    assert run.data.tags["device"] == "cpu" and run.data.tags["device.cpu"]  # recorded without torch


def test_second_base_moves_base_alias_and_leaves_production(trained):
    cfg, _, _, _ = trained
    second = run_base(cfg)
    assert second["version"] == "2"
    assert registry.alias_holder(cfg.mlflow.registered_model, "base") == "2"
    assert registry.alias_holder(cfg.mlflow.registered_model, "production") == "1"


def test_pretrained_weights_that_would_need_a_download_are_refused(tiny_project):
    cfg = compose([*tiny_project, "base.model=yolov8n.pt"])
    with pytest.raises(BadInput, match="does not download"):
        run_base(cfg)


def test_unreachable_tracking_server_fails_before_training(tiny_project, tmp_path):
    cfg = compose([*tiny_project, "mlflow.tracking_uri=http://127.0.0.1:9"])
    with pytest.raises(TrackingUnavailable, match="http://127.0.0.1:9"):
        run_base(cfg)
    assert not (tmp_path / "build" / "base" / "runs").exists()
