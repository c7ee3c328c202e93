"""Device facts of a run and the rules of detloop's training callbacks, without training."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from types import SimpleNamespace

import mlflow
import pytest
import torch

from detloop.evaluation.predictions import device_key
from detloop.model.yolo import device_info, merge_ranks, trained_on, training_device_info
from detloop.tracking.runs import EpochLogger, is_main_rank, training_rank

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only facts")


class Trainer(SimpleNamespace):
    """The attributes of Ultralytics' trainer that the callbacks read (a stand-in, not MLflow)."""

    def label_loss_items(self, loss_items=None, prefix="train"):
        return {f"{prefix}/box_loss": float(loss_items[0])}


def cpu_trainer(**changes) -> Trainer:
    values = {
        "epoch": 0,
        "epochs": 5,
        "stop": False,
        "device": torch.device("cpu"),
        "world_size": 0,
        "args": SimpleNamespace(device="", amp=True),
        "amp": False,
        "tloss": torch.tensor([1.0]),
        "lr": {"lr/pg0": 0.01},
        "metrics": {"metrics/mAP50(B)": 0.25},
    }
    return Trainer(**{**values, **changes})


@cpu_only
def test_cpu_device_info_names_the_cpu_its_threads_and_amp_off():
    info = device_info()
    assert info["device"] == info["device.type"] == "cpu"
    assert info["device.amp"] == "false"
    assert info["device.name"] == info["device.cpu"] != ""
    assert int(info["device.threads"]) == torch.get_num_threads()
    assert float(info["device.memory_gb"]) >= 0
    assert "device.cuda" not in info and "device.driver" not in info


@cpu_only
def test_asking_for_a_gpu_on_a_cpu_only_machine_does_not_fail():
    assert device_info("0,1")["device"] == "cpu"
    assert device_info("cuda:0")["device.amp"] == "false"


def test_a_cpu_trainer_is_recorded_as_the_cpu_with_amp_as_ultralytics_decided():
    trainer = cpu_trainer()
    assert trained_on(trainer) == "cpu"
    info = training_device_info(trainer)
    assert info["device"] == "cpu" and info["device.amp"] == "false" and info["device.world_size"] == "1"
    assert training_device_info(cpu_trainer(amp=True))["device.amp"] == "true"
    bf16 = cpu_trainer(amp=True, args=SimpleNamespace(device="", amp="bf16"))
    assert training_device_info(bf16)["device.amp"] == "bf16"


@pytest.mark.parametrize(
    ("env", "rank", "main"),
    [
        ({}, -1, True),
        ({"RANK": "1"}, -1, True),  # Ultralytics ignores RANK without WORLD_SIZE > 1
        ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}, 0, True),
        ({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}, 1, False),
    ],
)
def test_the_rank_is_read_from_the_environment_at_call_time(monkeypatch, env, rank, main):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert training_rank() == rank
    assert is_main_rank() is main


def test_outside_a_process_group_merge_ranks_is_this_rank_alone():
    assert merge_ranks({0: 1.5}) == {0: 1.5}


@pytest.fixture
def store(registry_store, tmp_path):
    """A tracking URI and an experiment of this test's own in the shared SQLite store."""
    uri = f"sqlite:///{registry_store / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    return uri, client, client.create_experiment(f"devices-{tmp_path.name}")


def test_the_logger_pickles_and_logs_into_its_run_not_the_active_one(store):
    uri, client, experiment_id = store
    target = client.create_run(experiment_id).info.run_id
    logger = pickle.loads(pickle.dumps(EpochLogger(target, tracking_uri=uri)))
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=experiment_id) as active:
        logger.on_fit_epoch_end(cpu_trainer())
    assert client.get_run(active.info.run_id).data.metrics == {}
    assert client.get_run(target).data.metrics == {"train/box_loss": 1.0, "metrics/mAP50B": 0.25, "lr/pg0": 0.01}


def test_after_early_stopping_the_next_call_is_the_final_validation(store):
    uri, client, experiment_id = store
    run_id = client.create_run(experiment_id).info.run_id
    logger = EpochLogger(run_id, tracking_uri=uri)
    # given training stops early after epoch 2 of 5 (Ultralytics sets `stop` before the callback)
    logger.on_fit_epoch_end(cpu_trainer(epoch=0))
    logger.on_fit_epoch_end(cpu_trainer(epoch=1, stop=True))
    # when best.pt's final validation calls back at epoch 2
    logger.on_fit_epoch_end(cpu_trainer(epoch=2, stop=True, metrics={"metrics/mAP50(B)": 0.5}))
    # then it is logged as final/, not as a third epoch
    assert [m.step for m in client.get_metric_history(run_id, "train/box_loss")] == [1, 2]
    assert client.get_run(run_id).data.metrics["final/metrics/mAP50B"] == 0.5
    assert [m.value for m in client.get_metric_history(run_id, "metrics/mAP50B")] == [0.25, 0.25]


@cpu_only
def test_a_process_without_torch_records_the_same_cpu_facts_without_loading_it():
    """A stage that runs no model (evaluate from a kept pass, gate bookkeeping, promote) does not pay
    torch's import to name the device: same tags as with torch, except torch's thread count."""
    code = (
        "import json, sys\n"
        "from detloop.evaluation.predictions import device_key\n"
        "from detloop.model.yolo import device_info\n"
        "print(json.dumps({'info': device_info(), 'key': device_key(None), 'torch': 'torch' in sys.modules}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["torch"] is False
    with_torch = device_info()
    assert found["info"] == {k: v for k, v in with_torch.items() if k != "device.threads"}
    assert found["key"] == device_key(None)
