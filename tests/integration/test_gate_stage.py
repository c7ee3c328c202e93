"""Stage `gate` on the tiny demo: both models on the same sets, the decision recorded everywhere, no alias moves."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import mlflow
import pandas as pd
import pytest
from tests.conftest import ROOT, tiny_overrides

from detloop.base import run as run_base
from detloop.cli.main import main as cli_main
from detloop.core.config import compose
from detloop.evaluate import run as run_evaluate
from detloop.evaluation import gates, gating
from detloop.finetune import run as run_finetune
from detloop.gate import run as run_gate
from detloop.mix import run as run_mix
from detloop.promote import run as run_promote
from detloop.retrain import run as run_retrain
from detloop.tracking import records, registry

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_data):
    """Given a tiny project with a base (v1, base + production) and a forced fine-tune candidate (v2)."""
    base = tmp_path_factory.mktemp("gate")
    shutil.copytree(tiny_data, base / "data")
    overrides = tiny_overrides(base)
    run_base(compose(overrides))
    forced = compose([*overrides, "trigger.force=true"])
    run_mix(forced)
    run_finetune(forced)
    return overrides, base


def pass_timings(record: dict, remove: bool = False) -> dict[tuple[str, str], dict]:
    """The timings of each prediction pass in a gate record, by (role, set); ``remove``: taken out of it."""
    return {
        (role, key): found.pop("timings") if remove else found["timings"]
        for role, by_set in record["measured"].items()
        for key, found in by_set.items()
    }


def test_the_gate_compares_the_candidate_with_production_and_records_the_decision(project):
    overrides, base = project
    cfg = compose([*overrides, f"gate.ab.data={base / 'data' / 'anchor' / 'images' / 'val'}"])
    # when the gate stage runs
    run_gate(cfg)
    record = json.loads((base / "build" / "gate" / "decision.json").read_text())
    # then v2 was measured against v1 (production) on the same sets, with every gate
    assert record["candidate"]["version"] == "2" and record["production"] == {"version": "1", "alias": "production"}
    assert set(record["gates"]) == {"regression", "new_samples", "ab", "served"}
    # the served runtime (the version's ONNX export) measured on the Gate 1 and Gate 2 sets beside the weights
    served = record["gates"]["served"]
    assert served["runtime"].startswith("onnxruntime ")
    assert set(record["measured"]["served"]) == {"anchor_test", "pool_holdout"}
    assert served["served_map50"] == record["measured"]["served"]["anchor_test"]["map50"]
    gap = abs(served["served_map50"] - record["measured"]["candidate"]["anchor_test"]["map50"]) * 100
    assert served["map50_gap"] == gap and served["decision"] == ("pass" if gap <= 1.0 else "review")
    assert record["decision"] == gates.combine(record["gates"])
    # every pass the finetune stage made ahead is read from the prediction cache; the A/B sample (not set when
    # the fine-tune ran) is predicted here
    cached = {where: timings["predictions_cached"] for where, timings in pass_timings(record).items()}
    assert {where for where, hit in cached.items() if not hit} == {("candidate", "ab"), ("reference", "ab")}
    assert len(cached) == 10
    cand, ref = record["measured"]["candidate"], record["measured"]["reference"]
    assert cand["anchor_test"]["images"] == ref["anchor_test"]["images"] == 8
    assert cand["ab"]["images"] == 8  # the A/B sample: all 8 labelled images (size 100 > 8)
    assert record["sets"]["pool_holdout"]["images"] == len(
        [
            r
            for r in map(json.loads, (base / "data/pool/manifest.jsonl").read_text().splitlines())
            if r["split"] == "holdout"
        ]
    )
    regression = record["gates"]["regression"]
    assert regression["drop"] == pytest.approx((ref["anchor_test"]["map50"] - cand["anchor_test"]["map50"]) * 100)
    # and the decision is a DVC metric, version tags, MLflow metrics and a report on the candidate's run
    metrics = json.loads((base / "build" / "gate" / "metrics.json").read_text())
    assert metrics["finetune"]["decision"] == record["decision"]
    assert metrics["finetune"]["gate.regression.drop"] == pytest.approx(regression["drop"])
    tags = {v["version"]: v for v in registry.versions(cfg)}["2"]["tags"]
    assert tags["decision"] == tags["gate.decision"] == record["decision"]
    assert tags["gate.reference_version"] == "1" and "gate.ab.worst_drop" in tags
    assert float(tags["gate.regression.drop"]) == pytest.approx(regression["drop"], abs=1e-4)
    assert not any(".per_class." in key for key in tags)  # per-class figures are run metrics only
    run = mlflow.get_run(record["candidate"]["run_id"])
    assert run.data.tags["gate.ab.decision"] == record["gates"]["ab"]["decision"]  # details live on the run
    # the record the rules trust: the gate's decision.json among the run's artifacts, read back
    proof = records.evidence(cfg, "2")
    assert proof.decision == record["decision"] and proof.kind == "finetune" and not proof.tampered
    assert run.data.metrics["gate.regression.candidate_map50"] == pytest.approx(cand["anchor_test"]["map50"])
    assert run.data.tags["gate.decision"] == record["decision"]
    # both models' figures on the same sets under the same names, for the MLflow compare view
    reference = mlflow.get_run(registry.client().get_model_version(cfg.mlflow.registered_model, "1").run_id)
    assert run.data.metrics["gate/anchor_test/map50"] == pytest.approx(cand["anchor_test"]["map50"])
    assert reference.data.metrics["gate/anchor_test/map50"] == pytest.approx(ref["anchor_test"]["map50"])
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "gate")}
    assert artifacts == {"gate/report.md", "gate/per_class.png", "gate/decision.json"}
    # and the label check of the pool: the candidate's findings from the gate's own predictions, with the base's
    # from before training, in the record; the report lists the flagged samples when Gate 2 did not pass
    check = record["label_check"]
    assert check["models"] == {"v1": "base, before training", "v2": "candidate"}
    assert check["checked"] == record["sets"]["pool_holdout"]["images"] + record["sets"]["pool_trained_on"]["images"]
    report = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/gate/report.md")
    assert ("## Label check" in report) == (record["gates"]["new_samples"]["decision"] != "pass")
    # and no alias moved: that is the promote stage's job
    assert registry.alias_holder(cfg.mlflow.registered_model, "production") == "1"
    assert (base / "build" / "gate" / "retrain.json").read_text().startswith('{\n  "reason"')


def test_the_passes_made_ahead_give_the_gate_figures_of_passes_made_from_scratch(project, tmp_path, caplog):
    overrides, base = project
    cfg = compose(overrides)
    # the gate from the fine-tune stage's passes, then with the prediction cache off (every pass made here)
    decision = base / "build" / "gate" / "decision.json"

    def measured() -> tuple[dict, dict, bool]:
        record = json.loads(decision.read_text())
        timings = pass_timings(record, remove=True).values()
        return record["measured"], record["figures"], all(t["predictions_cached"] for t in timings)

    run_gate(cfg)
    kept = measured()
    run_gate(compose([*overrides, "evaluate.cache.keep=0"]))
    fresh = measured()
    assert kept[2] is True and fresh[2] is False
    assert fresh[:2] == kept[:2]  # every set's figures, both models and the served export, digit for digit
    # a version whose passes cannot be made (here: none registered) is left to the gate, with the reason
    assert gating.predict_ahead(cfg, "99", tmp_path) is False
    assert "the gate's passes are not made ahead (the gate makes them)" in caplog.text
    assert gating.predict_ahead(compose([*overrides, "evaluate.cache.keep=0"]), "2", tmp_path) is False


def test_one_anchor_test_map50_per_version_in_dvc_metrics_registry_and_gate_report(project):
    overrides, base = project
    cfg = compose(overrides)
    # given the evaluate stage measured the base (v1) and the gate measured v2 against it
    evaluated = run_evaluate(cfg)
    run_gate(cfg)
    record = json.loads((base / "build" / "gate" / "decision.json").read_text())
    dvc_metrics = json.loads((base / "build" / "evaluate" / "metrics.json").read_text())
    tags = {v["version"]: v["tags"] for v in registry.versions(cfg)}
    # then v1 has one anchor-test mAP50: DVC metrics = the gate's reference figure = the registry's column
    ref = record["measured"]["reference"]["anchor_test"]
    assert dvc_metrics["map50"] == evaluated["map50"] == ref["map50"]
    assert dvc_metrics["map50_95"] == ref["map50_95"]
    assert tags["1"]["eval.anchor_test.map50"] == f"{ref['map50']:.4f}"
    # and the fine-tune (v2) has its figure in the registry too, the one its gate measured
    cand = record["measured"]["candidate"]["anchor_test"]
    assert tags["2"]["eval.anchor_test.map50"] == f"{cand['map50']:.4f}"
    report = mlflow.artifacts.load_text(f"runs:/{record['candidate']['run_id']}/gate/report.md")
    assert f"| {ref['map50']:.4f} | {cand['map50']:.4f} |" in report
    table = registry.format_table(registry.versions(cfg))
    assert f"{cand['map50']:.4f}" in table and f"{ref['map50']:.4f}" in table


def test_promote_then_rollback_serves_the_previous_version_through_pyfunc(project):
    overrides, base = project
    cfg = compose(overrides)
    name = cfg.mlflow.registered_model
    image = sorted((base / "data" / "anchor" / "images" / "test").iterdir())[0]
    table = pd.DataFrame({"image": [str(image)]})
    # given the gate's decision on v2 acted on by the promote stage, and v2 in production
    # (by a recorded human decision when the tiny model did not pass on its own)
    run_promote(cfg)
    decision = json.loads((base / "build" / "gate" / "decision.json").read_text())["decision"]
    if registry.alias_holder(name, "production") != "2":
        assert decision != "pass"
        assert cli_main(["promote", "2", "--reviewer", "qa", "--reason", "ship v2", "--force", *overrides]) == 0
    assert registry.alias_holder(name, "production") == "2"
    # when a user rolls back
    assert cli_main(["rollback", "--reviewer", "qa", "--reason", "v2 misses signatures", *overrides]) == 0
    # then production is v1 again, v2 stays registered, and the production model loads and predicts as v1
    assert registry.alias_holder(name, "production") == "1"
    assert registry.client().get_model_version(name, "2").tags["rolled_back"] == "true"
    served = mlflow.pyfunc.load_model(f"models:/{name}@production")
    assert served.metadata.run_id == registry.client().get_model_version(name, "1").run_id
    expected = mlflow.pyfunc.load_model(f"models:/{name}/1").predict(table)
    pd.testing.assert_frame_equal(served.predict(table), expected)
    moves = [m for m in registry.history(cfg) if m["alias"] == "production"]
    assert (moves[-1]["decision"], moves[-1]["from_version"], moves[-1]["to_version"]) == ("rollback", "2", "1")


def test_a_retrained_base_is_gated_against_the_base_alias(project):
    overrides, base = project
    cfg = compose([*overrides, "retrain.force=true"])
    run_mix(cfg)
    version = run_retrain(cfg)["version"]
    run_gate(compose(overrides))
    record = json.loads((base / "build" / "gate" / "retrain.json").read_text())
    assert record["candidate"] == {**record["candidate"], "version": version, "kind": "base"}
    assert record["production"] == {"version": "1", "alias": "base"}
    # the retrain stage made the gate's passes of its version (all reused here)
    passes = pass_timings(record).values()
    assert passes and all(timings["predictions_cached"] for timings in passes)
    assert registry.alias_holder(cfg.mlflow.registered_model, "base") == "1"


def test_every_job_of_a_finetune_sweep_is_gated_under_one_parent_run(project):
    overrides, base = project
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    run_mix(compose([*overrides, "trigger.force=true"]))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "detloop.finetune",
            "-m",
            "finetune.train.lr0=0.001,0.01",
            "trigger.force=true",
            *overrides,
            f"hydra.sweep.dir={base / 'sweep'}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    cfg = compose(overrides)
    sweep_dir = str(base / "sweep")
    swept = [
        v
        for v in registry.versions(cfg)
        if v["tags"].get("kind") == "finetune"
        and mlflow.get_run(v["run_id"]).data.tags.get("detloop.sweep_dir") == sweep_dir
    ]
    assert len(swept) == 2
    for version in swept:
        assert version["tags"]["gate.decision"] in ("pass", "review", "reject")
        assert version["tags"]["gate.reference_version"] == "1" and version["aliases"] == []
    parents = {mlflow.get_run(v["run_id"]).data.tags.get("mlflow.parentRunId") for v in swept}
    assert len(parents) == 1 and None not in parents
