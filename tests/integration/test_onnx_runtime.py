"""The served runtime: registration logs an ONNX export with the version, the pyfunc runs it on ONNX Runtime,
and its boxes match the PyTorch model's within a stated tolerance (real export, real ONNX Runtime)."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
from tests.serving_helpers import anchor_classes, detector_weights, page_bytes, register_detector

# ONNX Runtime and PyTorch compute the same network in float32 with different kernels
BOX_TOLERANCE_PX = 0.5
CONF_TOLERANCE = 1e-3
BOX = ["x1", "y1", "x2", "y2"]


def _frame(n: int):
    import pandas as pd

    return pd.DataFrame({"image": [base64.b64encode(page_bytes(seed, (96, 120))).decode() for seed in range(n)]})


def _match(a, b) -> tuple[int, float, float]:
    """Rows of ``a`` matched to ``b`` (same image and class, IoU-greedy); largest box and confidence gaps."""
    matched, box_gap, conf_gap = 0, 0.0, 0.0
    used: set[int] = set()
    for _, row in a.iterrows():
        same = b[(b["row"] == row["row"]) & (b["class_id"] == row["class_id"])]
        box = row[BOX].to_numpy(float)
        gaps = [(float(np.abs(r[BOX].to_numpy(float) - box).max()), i) for i, r in same.iterrows() if i not in used]
        if not gaps:
            continue
        gap, i = min(gaps)
        used.add(i)
        matched += 1
        box_gap = max(box_gap, gap)
        conf_gap = max(conf_gap, abs(float(b.loc[i, "confidence"]) - float(row["confidence"])))
    return matched, box_gap, conf_gap


def test_registered_version_is_served_from_its_onnx_export(registry_cfg, tiny_data, tmp_path):
    import mlflow
    import torch

    torch.manual_seed(0)  # the untrained network's weights: the same boxes on every run
    names = anchor_classes(tiny_data)
    weights = detector_weights(tmp_path / "hot.pt", names, hot_class=2)
    version = register_detector(registry_cfg, weights, imgsz=64, conf=0.5)
    uri = f"models:/{registry_cfg.mlflow.registered_model}/{version}"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path / "dl")))
    assert sorted(p.name for p in (local / "artifacts").iterdir()) == ["hot.onnx", "hot.pt"]

    served = mlflow.pyfunc.load_model(uri)
    torch_model = mlflow.pyfunc.load_model(uri, model_config={"runtime": "torch"})
    assert served.unwrap_python_model().runtime == "onnx"
    assert served.unwrap_python_model().providers == ["CPUExecutionProvider"]
    assert torch_model.unwrap_python_model().runtime == "torch"
    # the pyfunc's own default: every CPU of the process; a model config's threads set the session's
    from detloop.model.runtime import cpu_threads

    assert served.unwrap_python_model().threads == cpu_threads()
    one = mlflow.pyfunc.load_model(uri, model_config={"threads": 1})
    assert one.unwrap_python_model().threads == 1
    assert torch_model.unwrap_python_model().threads is None

    frame = _frame(6)
    onnx_rows, torch_rows = served.predict(frame), torch_model.predict(frame)
    assert len(torch_rows) > 0
    matched, box_gap, conf_gap = _match(torch_rows, onnx_rows)
    assert matched == len(torch_rows) == len(onnx_rows), (len(torch_rows), len(onnx_rows), matched)
    print(f"onnx vs torch: {matched} boxes, largest box gap {box_gap:.4f} px, confidence gap {conf_gap:.6f}")
    assert box_gap <= BOX_TOLERANCE_PX and conf_gap <= CONF_TOLERANCE, (box_gap, conf_gap)


def test_a_version_without_an_export_is_served_by_pytorch(registry_cfg, tiny_data, tmp_path):
    import mlflow
    import torch

    from detloop.core.errors import BadInput
    from detloop.model.pyfunc import log_detector
    from detloop.tracking import runs

    torch.manual_seed(0)
    weights = detector_weights(tmp_path / "plain.pt", anchor_classes(tiny_data), hot_class=1)
    with mlflow.start_run(experiment_id=runs.setup(registry_cfg)):  # as with mlflow.export.onnx=false
        info = log_detector(
            weights, {"imgsz": 64}, registered_model_name=registry_cfg.mlflow.registered_model, onnx=False
        )
    uri = f"models:/{registry_cfg.mlflow.registered_model}/{info.registered_model_version}"
    model = mlflow.pyfunc.load_model(uri)
    assert model.unwrap_python_model().runtime == "torch" and model.unwrap_python_model().providers == ["torch"]
    assert len(model.predict(_frame(2))) > 0
    with pytest.raises(BadInput, match="runtime 'onnx' asked for, but it holds no ONNX export"):
        mlflow.pyfunc.load_model(uri, model_config={"runtime": "onnx"})


@pytest.mark.gpu
def test_on_a_gpu_the_export_runs_on_onnx_runtimes_cuda_provider(registry_cfg, tiny_data, tmp_path):
    """With onnxruntime-gpu installed (README), the same version is served on the GPU, same boxes."""
    import mlflow
    import torch

    torch.manual_seed(0)
    weights = detector_weights(tmp_path / "gpu.pt", anchor_classes(tiny_data), hot_class=3)
    version = register_detector(registry_cfg, weights, imgsz=64, conf=0.5)
    uri = f"models:/{registry_cfg.mlflow.registered_model}/{version}"
    on_gpu = mlflow.pyfunc.load_model(uri, model_config={"device": "0"})
    assert on_gpu.unwrap_python_model().providers[0] == "CUDAExecutionProvider"
    on_cpu = mlflow.pyfunc.load_model(uri, model_config={"device": "cpu"})
    frame = _frame(4)
    gpu_rows, cpu_rows = on_gpu.predict(frame), on_cpu.predict(frame)
    matched, box_gap, conf_gap = _match(cpu_rows, gpu_rows)
    assert matched == len(cpu_rows) == len(gpu_rows) and box_gap <= BOX_TOLERANCE_PX and conf_gap <= CONF_TOLERANCE
