"""The served runtime's rules: which runtime a version is loaded with, and the gate's served-model check."""

from __future__ import annotations

from pathlib import Path

import pytest

from detloop.core.config import compose
from detloop.core.errors import BadInput
from detloop.evaluation import gates
from detloop.model import runtime


def test_auto_serves_the_export_when_there_is_one(tmp_path):
    exported = tmp_path / "best.onnx"
    assert runtime.choose("auto", exported) == "onnx"
    assert runtime.choose("auto", None) == "torch"  # a version registered without an export
    assert runtime.choose("torch", exported) == "torch"
    assert runtime.choose("onnx", exported) == "onnx"


def test_asking_for_onnx_without_an_export_is_refused_by_name():
    with pytest.raises(BadInput, match="runtime 'onnx' asked for, but it holds no ONNX export"):
        runtime.choose("onnx", None)
    with pytest.raises(BadInput, match="runtime must be one of auto, onnx, torch, got 'tensorrt'"):
        runtime.choose("tensorrt", Path("x.onnx"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("serve.runtime=tensorrt", "serve.runtime: must be one of auto, onnx, torch or null, got 'tensorrt'"),
        ("serve.threads=0", "serve.threads: must be a whole number >= 1 or null, got 0"),
        ("serve.threads=two", "serve.threads: must be a whole number >= 1 or null, got 'two'"),
    ],
)
def test_a_bad_serving_override_is_refused_naming_its_key_before_any_load(override, message):
    from detloop.production.service import runtime_overrides

    with pytest.raises(BadInput, match=message):
        runtime_overrides(compose([override]))


def test_serve_overrides_are_passed_to_the_loader_only_when_set():
    from detloop.production.service import runtime_overrides

    assert runtime_overrides(compose([])) == {}
    assert runtime_overrides(compose(["serve.runtime=torch", "serve.threads=3"])) == {"runtime": "torch", "threads": 3}


def _measured(map50: float, rate: float) -> dict:
    return {
        "anchor_test": {"objects": 10, "map50": map50, "detection_rate": 0.5},
        "pool_holdout": {"objects": 10, "map50": 0.4, "detection_rate": rate},
    }


@pytest.mark.parametrize(
    ("served", "decision"),
    [
        (_measured(0.9000, 0.8000), "pass"),  # identical figures
        (_measured(0.9095, 0.7950), "pass"),  # 0.95 and 0.5 points apart: within 1.0
        (_measured(0.8880, 0.8000), "review"),  # 1.2 points of mAP50 apart
        (_measured(0.9000, 0.7850), "review"),  # 1.5 points of detection rate apart
    ],
)
def test_the_served_runtime_must_give_the_gated_figures(served, decision):
    cfg = compose([])
    gated = _measured(0.9000, 0.8000)
    found = gates.served_gate(cfg, gated, served, "onnxruntime 1.31.1")
    assert found["decision"] == decision
    assert found["map50_gap"] == pytest.approx(abs(served["anchor_test"]["map50"] - 0.9) * 100)
    assert found["detection_rate_gap"] == pytest.approx(abs(served["pool_holdout"]["detection_rate"] - 0.8) * 100)
    assert found["text"].startswith(f"Served model (onnxruntime 1.31.1) {decision.upper()}")


def test_a_failed_served_check_can_reject_and_a_torch_version_has_nothing_to_compare():
    cfg = compose(["gate.served.on_fail=reject"])
    assert gates.served_gate(cfg, _measured(0.9, 0.8), _measured(0.8, 0.8), "onnxruntime")["decision"] == "reject"
    assert gates.served_gate(cfg, _measured(0.9, 0.8), None, "torch") == {
        "decision": "pass",
        "runtime": "torch",
        "text": "Served model: torch, the weights gated above.",
    }
    with pytest.raises(BadInput, match="gate.served.on_fail='later' is not review or reject"):
        gates.served_gate(compose(["gate.served.on_fail=later"]), _measured(0.9, 0.8), _measured(0.5, 0.8), "x")
