"""The pool readers, the fixed pool split and the fine-tune trigger policy (document section 5)."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import mlflow
import pytest
from tests.conftest import tiny_overrides

from detloop.cli.main import main
from detloop.core.config import compose
from detloop.core.errors import BadInput
from detloop.data import pool
from detloop.data.manifest import split_for, write_manifest
from detloop.tracking import registry, runs

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
SPLIT = {"train": 0.7, "val": 0.1, "holdout": 0.2}


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def overrides(tmp_path: Path, tiny_data: Path) -> list[str]:
    """A private copy of the tiny demo data (pool of 12) and a performance flag path under tmp."""
    shutil.copytree(tiny_data, tmp_path / "data")
    return [*tiny_overrides(tmp_path), f"trigger.performance_flag={tmp_path / 'flag.json'}"]


@pytest.fixture
def cfg(overrides):
    return compose(overrides)


def with_pool(overrides: list[str], tmp_path: Path, size: int, *extra: str):
    """A config whose pool manifest has ``size`` verified rows (the trigger only reads rows)."""
    rows = [
        {
            "id": f"report-{i:05d}",
            "sha256": f"{i:064x}",
            "reviewer": "a.chen",
            "verified_at": "2025-02-01T00:00:00Z",
            "split": split_for(f"report-{i:05d}", SPLIT),
        }
        for i in range(size)
    ]
    write_manifest(tmp_path / "synthetic-pool" / "manifest.jsonl", rows)
    return compose([*overrides, f"paths.pool={tmp_path / 'synthetic-pool'}", *extra])


def last(pool_size: int, days_ago: float = 1.0) -> dict:
    return {"version": "7", "pool_size": pool_size, "created": (NOW - timedelta(days=days_ago)).isoformat()}


# --------------------------------------------------------------------------- the fixed split


def test_a_sample_split_is_stable_and_near_70_10_20():
    # given many ids, in the demo's and in inbox add's formats
    ids = [f"report-{i:05d}" for i in range(5000)] + [f"report-{i:012x}" for i in range(0, 5000 * 7919, 7919)]
    # when each is split twice
    first = [split_for(i, SPLIT) for i in ids]
    again = [split_for(i, dict(SPLIT)) for i in reversed(ids)][::-1]
    # then the split never changes, and the shares are within 1.5 points of the configured ones
    assert first == again
    shares = {name: n / len(ids) for name, n in Counter(first).items()}
    for name, share in SPLIT.items():
        assert abs(shares[name] - share) < 0.015, shares


# --------------------------------------------------------------------------- reading the pool


def test_pool_samples_are_the_images_of_each_split(cfg, tmp_path):
    # given the tiny demo pool of 12 verified samples
    rows = pool.pool_rows(cfg)
    # when the samples of each split are listed
    samples = {split: pool.pool_samples(cfg, split) for split in SPLIT}
    # then every row is listed once, in its stored split, with an existing image
    assert sum(len(paths) for paths in samples.values()) == len(rows) == 12
    by_id = {row["id"]: row["split"] for row in rows}
    for split, paths in samples.items():
        assert all(p.is_file() and by_id[p.stem] == split for p in paths)
    assert pool.split_counts(cfg) == {split: len(paths) for split, paths in samples.items()}
    with pytest.raises(BadInput, match="'test'"):
        pool.pool_samples(cfg, "test")


def test_check_reviewed_refuses_an_image_without_a_review_record(cfg, tmp_path):
    pool.check_reviewed(cfg)  # the demo pool is fully reviewed
    stray = tmp_path / "data/pool/images/sneaked-in.jpg"
    shutil.copy(next((tmp_path / "data/inbox/images").iterdir()), stray)
    with pytest.raises(BadInput) as info:
        pool.check_reviewed(cfg)
    assert any(str(stray) in p and "without a review record" in p for p in info.value.problems)


def test_retrain_is_due_at_the_threshold_of_new_samples_since_the_newest_base(overrides, tmp_path):
    # given a threshold of 20 and the anchor-only base (no pool samples seen)
    assert pool.retrain_status(with_pool(overrides, tmp_path, 20, "retrain.threshold=20"), None)["due"]
    waiting = pool.retrain_status(with_pool(overrides, tmp_path, 19, "retrain.threshold=20"), None)
    assert not waiting["due"] and waiting["message"].startswith("base retrain waiting: 19/20")
    # when the newest base was trained on a pool of 15: only 5 (or 24) are new
    cfg = with_pool(overrides, tmp_path, 20, "retrain.threshold=20")
    assert not pool.retrain_status(cfg, {"version": "4", "pool_size": 15})["due"]
    cfg = with_pool(overrides, tmp_path, 39, "retrain.threshold=20")
    status = pool.retrain_status(cfg, {"version": "4", "pool_size": 15})
    assert status["due"] and status["new_since_base"] == 24 and "since base v4 (pool 15)" in status["message"]


def test_a_forced_retrain_is_due_and_says_so(overrides, tmp_path):
    status = pool.retrain_status(with_pool(overrides, tmp_path, 3, "retrain.force=true"), None)
    assert status["due"] and status["forced"] and "forced" in status["message"]


def test_last_base_is_the_newest_base_version_with_its_pool_size(cfg):
    runs.setup(cfg)
    assert registry.last_base_from_registry(cfg) is None
    client = mlflow.MlflowClient()
    name = cfg.mlflow.registered_model
    client.create_registered_model(name)
    client.create_model_version(name, "file:///nowhere", tags={"kind": "base"})
    client.create_model_version(name, "file:///nowhere", tags={"kind": "finetune", "pool.size": "90"})
    assert registry.last_base_from_registry(cfg) == {"version": "1", "pool_size": 0}
    client.create_model_version(name, "file:///nowhere", tags={"kind": "base", "retrain": "true", "pool.size": "40"})
    assert registry.last_base_from_registry(cfg) == {"version": "3", "pool_size": 40}


# --------------------------------------------------------------------------- trigger policy


def test_below_the_minimum_it_waits_and_says_how_many(overrides, tmp_path):
    # given 123 verified samples, 100 of them already in the last fine-tune
    cfg = with_pool(overrides, tmp_path, 123)
    # when the policy is asked
    status = pool.trigger_status(cfg, last(100), now=NOW)
    # then it waits for 27 more
    assert status.message == "waiting: 23/50 new verified samples"
    assert not status.triggered and not status.forced
    assert (status.pool_size, status.new_samples, status.min_new_samples) == (123, 23, 50)
    assert sum(status.split_counts.values()) == 123


def test_volume_triggers_at_min_new_samples(overrides, tmp_path):
    cfg = with_pool(overrides, tmp_path, 150)
    assert pool.trigger_status(cfg, last(100), now=NOW).triggers["volume"]  # exactly 50 new
    status = pool.trigger_status(cfg, None, now=NOW)  # no fine-tune yet: all 150 are new
    assert status.triggered and status.new_samples == 150
    assert status.message == "fine-tune due (volume): 150/50 new verified samples"
    assert not pool.trigger_status(cfg, last(101), now=NOW).triggered  # 49 new


def test_the_schedule_still_needs_min_new_samples(overrides, tmp_path):
    # given a weekly schedule and a fine-tune 10 days ago, with only 23 new samples
    cfg = with_pool(overrides, tmp_path, 123, "trigger.schedule_days=7")
    status = pool.trigger_status(cfg, last(100, days_ago=10), now=NOW)
    # then the schedule is due but does not trigger, and says why
    assert not status.triggered
    assert any(
        r.startswith("schedule: due (10.0 days") and "never fine-tune on fewer than 50" in r for r in status.reasons
    )
    # and with 60 new samples it triggers
    status = pool.trigger_status(cfg, last(63, days_ago=10), now=NOW)
    assert status.triggered and status.triggers["schedule"]
    # and before the period it is not due
    status = pool.trigger_status(cfg, last(63, days_ago=3), now=NOW)
    assert not status.triggers["schedule"] and any("due after 7" in r for r in status.reasons)


def test_a_performance_flag_triggers_with_at_least_one_new_sample(overrides, tmp_path):
    # given the monitor's flag with a reason
    (tmp_path / "flag.json").write_text(json.dumps({"reason": "title detection rate 0.82 < 0.90"}))
    cfg = with_pool(overrides, tmp_path, 101)
    # when there is one new sample, it triggers and names the reason
    status = pool.trigger_status(cfg, last(100), now=NOW)
    assert status.triggered and status.triggers == {
        "volume": False,
        "schedule": False,
        "performance": True,
        "force": False,
    }
    assert any("title detection rate 0.82 < 0.90" in r for r in status.reasons)
    assert status.message == "fine-tune due (performance): 1/50 new verified samples"
    # and with none, it does not
    status = pool.trigger_status(cfg, last(101), now=NOW)
    assert not status.triggered and any("no new verified samples" in r for r in status.reasons)


def test_force_triggers_regardless_and_is_recorded(overrides, tmp_path):
    cfg = with_pool(overrides, tmp_path, 100, "trigger.force=true")
    status = pool.trigger_status(cfg, last(100), now=NOW)
    assert status.triggered and status.forced and status.new_samples == 0
    assert status.message == "forced: 0/50 new verified samples (trigger.force=true)"


# --------------------------------------------------------------------------- registry


def test_last_finetune_is_read_from_the_registry(cfg):
    # given a real SQLite MLflow store with a base and two fine-tune versions
    runs.setup(cfg)
    assert registry.last_finetune_from_registry(cfg) is None  # no registered model yet
    client = mlflow.MlflowClient()
    name = cfg.mlflow.registered_model
    client.create_registered_model(name)
    source = Path(cfg.paths.build) / "model"
    source.mkdir(parents=True)
    client.create_model_version(name, str(source), tags={"kind": "base"})
    assert registry.last_finetune_from_registry(cfg) is None  # a base is not a fine-tune
    client.create_model_version(name, str(source), tags={"kind": "finetune", "pool.size": "40"})
    newest = client.create_model_version(name, str(source), tags={"kind": "finetune", "pool.size": "90"})
    client.create_model_version(name, str(source), tags={"kind": "base"})
    # when the last fine-tune is looked up
    found = registry.last_finetune_from_registry(cfg)
    # then it is the newest fine-tune version, with its pool size and creation time
    created = datetime.fromtimestamp(newest.creation_timestamp / 1000, UTC)
    assert found == {"version": "3", "pool_size": 90, "created": created.isoformat(timespec="seconds")}
    assert pool.trigger_status(cfg, found).new_samples == 0  # the tiny pool (12) is smaller than 90


def test_cli_pool_status(overrides, capsys):
    assert main(["pool", "status", "--json", *overrides]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["message"] == "waiting: 12/50 new verified samples"
    assert status["pool_size"] == 12 and status["last_finetune"] is None
    assert status["retrain"]["due"] is False and status["retrain"]["threshold"] == 2000
    assert main(["pool", "status", *overrides]) == 0
    out = capsys.readouterr().out
    assert "pool: 12 verified samples" in out and "[ ] volume: 12/50" in out
    assert "base retrain waiting: 12/2000 new verified samples since the anchor-only base" in out
