"""Training runs record the device they used, and DDP workers log once, into the stage run, by id.

Ultralytics DDP (``device=0,1``) pickles the trainer's callbacks into each worker process, where they
run on every rank outside the parent's active MLflow run. On the CPU the workers are stood in for by
``rank_worker.py`` subprocesses; the ``gpu`` tests train for real on CUDA (skipped without a GPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from tests.conftest import tiny_overrides

from detloop.base import run as run_base
from detloop.core.config import compose
from detloop.core.env import free_port
from detloop.tracking.runs import EpochLogger

pytestmark = pytest.mark.integration

WORKER = Path(__file__).with_name("rank_worker.py")
STEP_METRIC = "train/box_loss"


# --------------------------------------------------------------------------- DDP ranks, stood in on the CPU


class Callbacks:
    """Collects callbacks like a YOLO model does (``model.add_callback``), for pickling."""

    def __init__(self) -> None:
        self.callbacks: dict[str, list] = {}

    def add_callback(self, event: str, callback) -> None:
        self.callbacks.setdefault(event, []).append(callback)


@pytest.fixture
def stage_run(tmp_path):
    """Given a stage's run in a fresh SQLite store and its EpochLogger pickled as Ultralytics' DDP launch does."""
    import cloudpickle
    from ultralytics.utils.patches import torch_save

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("devices")
    run_id = client.create_run(experiment_id, tags={"stage": "base"}).info.run_id
    model = Callbacks()
    EpochLogger(run_id, tracking_uri=uri).attach(model)
    state = tmp_path / "ddp-state.pt"
    torch_save({"callbacks": model.callbacks}, state, pickle_module=cloudpickle)
    return client, run_id, state


def worker_env(rank: int, world_size: int = 2, **extra: str) -> dict[str, str]:
    """A DDP worker's environment as torch.distributed.run sets it, with no MLflow run or store of the parent."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size), **extra}


def run_worker(state: Path, cwd: Path, env: dict, *extra: str) -> subprocess.Popen:
    cwd.mkdir(exist_ok=True)
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(state), *extra],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out


def all_runs(client, cfg=None) -> list:
    """Every run in the store (but the registry's audit runs of alias moves, when ``cfg`` names them)."""
    audit = cfg.mlflow.audit_experiment if cfg is not None else None
    experiments = [e.experiment_id for e in client.search_experiments() if e.name != audit]
    return client.search_runs(experiments)


def test_rank_1_logs_nothing_and_rank_0_logs_into_the_stage_run_by_id(stage_run, tmp_path):
    client, run_id, state = stage_run
    # when the pickled logger runs in a non-zero rank (no MLflow environment, its own working folder)
    finish(run_worker(state, tmp_path / "rank1", worker_env(1)))
    # then it wrote nothing anywhere and started no run
    assert [r.info.run_id for r in all_runs(client)] == [run_id]
    run = client.get_run(run_id)
    assert run.data.metrics == {}
    assert not any(key.startswith("device") for key in run.data.tags)
    assert list((tmp_path / "rank1").iterdir()) == []  # no ./mlruns or ./mlflow.db of a stray fluent run

    # when it runs in rank 0
    finish(run_worker(state, tmp_path / "rank0", worker_env(0)))
    # then every epoch, the final validation and the device are in the given run, and no other run exists
    assert [r.info.run_id for r in all_runs(client)] == [run_id]
    assert [m.step for m in client.get_metric_history(run_id, STEP_METRIC)] == [1, 2]
    run = client.get_run(run_id)
    assert run.data.metrics["metrics/mAP50B"] == 0.25
    assert run.data.metrics["final/metrics/mAP50B"] == 0.5
    assert run.data.metrics["lr/pg0"] == 0.01
    assert run.data.tags["device"] == "cpu" and run.data.tags["device.amp"] == "false"
    assert run.data.tags["device.world_size"] == "2"
    assert list((tmp_path / "rank0").iterdir()) == []


def test_two_ranks_in_one_process_group_log_each_epoch_once(stage_run, tmp_path):
    client, run_id, state = stage_run
    port = str(free_port())
    # when both ranks run the callbacks together in a real (gloo) process group
    procs = [
        run_worker(state, tmp_path / f"rank{r}", worker_env(r, MASTER_ADDR="127.0.0.1", MASTER_PORT=port), "--group")
        for r in (0, 1)
    ]
    outputs = [finish(p) for p in procs]
    # then each epoch is logged once, into the stage run, and both ranks saw every rank's figures
    assert [r.info.run_id for r in all_runs(client)] == [run_id]
    assert [m.step for m in client.get_metric_history(run_id, STEP_METRIC)] == [1, 2]
    assert len(client.get_metric_history(run_id, "final/metrics/mAP50B")) == 1
    for out in outputs:
        assert json.loads(out.strip().splitlines()[-1]) == {"0": 1.0, "1": 2.0}


# --------------------------------------------------------------------------- a real tiny training on the CPU


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    """Given the tiny base stage trained once (1 epoch, 64 px) in a fresh store."""
    base = tmp_path_factory.mktemp("devices")
    overrides = tiny_overrides(base)
    overrides[1] = f"paths.data={tiny_data}"
    cfg = compose(overrides)
    return cfg, run_base(cfg), base


@pytest.mark.skipif(torch.cuda.is_available(), reason="trains on the GPU when there is one")
def test_cpu_training_run_records_the_cpu_and_amp_off(trained):
    cfg, result, _ = trained
    run = mlflow.get_run(result["run_id"])
    tags = run.data.tags
    assert tags["device"] == "cpu" and tags["device.type"] == "cpu"
    assert tags["device.amp"] == "false"
    assert tags["device.world_size"] == "1"
    assert tags["device.cpu"] and tags["device.name"] == tags["device.cpu"]
    assert int(tags["device.threads"]) >= 1 and int(tags["device.cpu_count"]) >= 1
    assert tags["device.torch"] == torch.__version__
    assert not any(key.startswith("device/") for key in run.data.metrics)  # no GPU memory to report


def test_training_logs_each_epoch_once_and_final_metrics_in_the_stage_run(trained):
    cfg, result, base = trained
    client = mlflow.MlflowClient()
    assert [r.info.run_id for r in all_runs(client, cfg)] == [result["run_id"]]
    history = client.get_metric_history(result["run_id"], STEP_METRIC)
    assert [m.step for m in history] == list(range(1, cfg.base.train.epochs + 1))
    final = {k: v for k, v in client.get_run(result["run_id"]).data.metrics.items() if k.startswith("final/")}
    assert "final/metrics/mAP50B" in final
    assert json.loads((base / "build" / "base" / "metrics.json").read_text()) == final


# --------------------------------------------------------------------------- CUDA (skipped without a GPU)


def _assert_gpu_tags(tags: dict, indices: list[int]) -> None:
    assert tags["device"] == "cuda:" + ",".join(map(str, indices))
    assert tags["device.type"] == "cuda" and tags["device.count"] == str(len(indices))
    assert tags["device.name"] == ", ".join(torch.cuda.get_device_name(i) for i in indices)
    assert all(float(gb) > 0 for gb in tags["device.memory_gb"].split(", "))
    assert tags["device.cuda"] == torch.version.cuda
    assert tags["device.cudnn"] == str(torch.backends.cudnn.version())
    assert tags["device.driver"] and (tags["device.driver"] != "unknown" or not _has_nvidia_smi())
    assert tags["device.amp"] in {"true", "false", "bf16"}


def _has_nvidia_smi() -> bool:
    import shutil

    return shutil.which("nvidia-smi") is not None


@pytest.fixture(scope="module")
def gpu_finetune(tmp_path_factory, tiny_data):
    """Given the tiny base and a forced tiny fine-tune, both trained on CUDA device 0."""
    import shutil

    from detloop.finetune import run as run_finetune
    from detloop.mix import run as run_mix

    base = tmp_path_factory.mktemp("gpu-finetune")
    shutil.copytree(tiny_data, base / "data")
    overrides = [*tiny_overrides(base), "base.train.device=0", "finetune.train.device=0", "trigger.force=true"]
    run_base(compose(overrides))
    run_mix(compose(overrides))
    return compose(overrides), run_finetune(compose(overrides))


@pytest.mark.gpu
def test_cuda_finetune_records_gpu_cuda_cudnn_driver_amp_and_peak_memory(gpu_finetune):
    _, result = gpu_finetune
    run = mlflow.get_run(result["run_id"])
    _assert_gpu_tags(run.data.tags, [0])
    assert run.data.tags["device.world_size"] == "1"
    assert run.data.metrics["device/gpu_0_peak_memory_gb"] > 0


@pytest.mark.gpu
def test_cuda_amp_tag_is_what_ultralytics_used(gpu_finetune, tmp_path):
    from detloop.model.yolo import load_model
    from detloop.tracking import runs
    from detloop.training.trainer import train_and_register

    cfg, _ = gpu_finetune
    model = load_model("yolov8n.yaml")
    trained = train_and_register(
        cfg,
        model,
        cfg.base,
        "base",
        _anchor_yaml(cfg),
        experiment_id=runs.setup(cfg),
        run_name="amp",
        params={},
        param_groups=["base"],
    )
    tags = mlflow.get_run(trained["run_id"]).data.tags
    assert tags["device.amp"] == ("true" if model.trainer.amp else "false")


def _anchor_yaml(cfg) -> Path:
    from detloop.core.stage import stage_dir
    from detloop.data.datasets import anchor_yaml

    return anchor_yaml(cfg, stage_dir(cfg, "base"))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP needs two GPUs")
def test_ddp_on_two_gpus_logs_each_epoch_once_into_the_stage_run(tmp_path, tiny_data):
    # given a tiny base trained with DDP on devices 0 and 1 (2 epochs, a batch both ranks can split)
    overrides = tiny_overrides(tmp_path)
    overrides[1] = f"paths.data={tiny_data}"
    cfg = compose([*overrides, "base.train.device='0,1'", "base.train.epochs=2", "base.train.batch=8"])
    cwd_before = set(Path.cwd().iterdir())
    result = run_base(cfg)
    # then the workers logged each epoch once into the stage run and started no other run
    client = mlflow.MlflowClient()
    assert [r.info.run_id for r in all_runs(client, cfg)] == [result["run_id"]]
    assert [m.step for m in client.get_metric_history(result["run_id"], STEP_METRIC)] == [1, 2]
    run = client.get_run(result["run_id"])
    assert "final/metrics/mAP50B" in run.data.metrics and result["metrics"]
    _assert_gpu_tags(run.data.tags, [0, 1])
    assert run.data.tags["device.world_size"] == "2"
    assert run.data.metrics["device/gpu_0_peak_memory_gb"] > 0
    assert run.data.metrics["device/gpu_1_peak_memory_gb"] > 0
    assert set(Path.cwd().iterdir()) == cwd_before  # no ./mlruns or ./mlflow.db from a worker
