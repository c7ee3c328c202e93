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
from detloop.tracking import runs, versions

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)  # a Saturday: weekly periods run Monday 2025-02-24 .. 2025-03-03
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


def rows_of(splits: list[str]) -> list[dict]:
    return [
        {
            "id": f"report-{i:05d}",
            "sha256": f"{i:064x}",
            "reviewer": "a.chen",
            "verified_at": "2025-02-01T00:00:00Z",
            "split": split,
        }
        for i, split in enumerate(splits)
    ]


def with_pool(overrides: list[str], tmp_path: Path, size: int, *extra: str):
    """A config whose pool manifest has ``size`` verified rows split by id hash (the trigger only reads rows)."""
    return with_splits(overrides, tmp_path, [split_for(f"report-{i:05d}", SPLIT) for i in range(size)], *extra)


def with_splits(overrides: list[str], tmp_path: Path, splits: list[str], *extra: str):
    """A config whose pool manifest has one verified row per entry of ``splits``, in that order."""
    write_manifest(tmp_path / "synthetic-pool" / "manifest.jsonl", rows_of(splits))
    return compose([*overrides, f"paths.pool={tmp_path / 'synthetic-pool'}", *extra])


def last(pool_size: int, days_ago: float = 1.0, at: datetime | None = None) -> dict:
    """The newest fine-tune as the registry reports it: trained on the first ``pool_size`` rows."""
    created = at or NOW - timedelta(days=days_ago)
    return {"version": "7", "pool_size": pool_size, "created": created.isoformat(timespec="seconds")}


def raise_flag(tmp_path: Path, at: datetime, reason: str = "title detection rate 0.82 < 0.90") -> Path:
    """The monitor's performance flag, as ``detloop monitor --raise-trigger`` writes it."""
    flag = tmp_path / "flag.json"
    record = {"reason": reason, "raised_by": "detloop monitor", "raised_at": at.strftime("%Y-%m-%dT%H:%M:%SZ")}
    flag.write_text(json.dumps(record, indent=2, sort_keys=True))
    return flag


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
    assert versions.last_base(cfg) is None
    client = mlflow.MlflowClient()
    name = cfg.mlflow.registered_model
    client.create_registered_model(name)
    client.create_model_version(name, "file:///nowhere", tags={"kind": "base"})
    client.create_model_version(name, "file:///nowhere", tags={"kind": "finetune", "pool.size": "90"})
    assert versions.last_base(cfg) == {"version": "1", "pool_size": 0}
    client.create_model_version(name, "file:///nowhere", tags={"kind": "base", "retrain": "true", "pool.size": "40"})
    assert versions.last_base(cfg) == {"version": "3", "pool_size": 40}


# --------------------------------------------------------------------------- the floor and volume


def test_below_the_floor_it_waits_and_says_how_many(overrides, tmp_path):
    # given 123 verified samples, 100 of them already in the last fine-tune
    cfg = with_pool(overrides, tmp_path, 123)
    train = sum(split_for(f"report-{i:05d}", SPLIT) == "train" for i in range(100, 123))
    # when the policy is asked
    status = pool.trigger_status(cfg, last(100), now=NOW)
    # then it waits, counting the new train samples only
    assert status.message == f"waiting: {train}/50 new train samples"
    assert not status.triggered and not status.forced
    assert (status.pool_size, status.new_samples, status.new_train_samples, status.min_train_samples) == (
        123,
        23,
        train,
        50,
    )
    assert sum(status.split_counts.values()) == 123


def test_49_trainable_samples_do_not_fine_tune_and_50_do(overrides, tmp_path):
    # given a fine-tune on the first 100 rows, then 70 new rows of which 49 are train
    new = ["train"] * 49 + ["val"] * 10 + ["holdout"] * 11
    cfg = with_splits(overrides, tmp_path, ["train"] * 100 + new)
    # when the policy is asked
    status = pool.trigger_status(cfg, last(100), now=NOW)
    # then 70 new samples are not enough: only 49 of them would be trained on
    assert (status.new_samples, status.new_train_samples) == (70, 49)
    assert not status.triggered and status.message == "waiting: 49/50 new train samples"
    assert "volume: 49/50 new train samples (trigger.volume.min_new_samples)" in status.reasons
    # and one more train sample starts the fine-tune
    cfg = with_splits(overrides, tmp_path, ["train"] * 100 + new + ["train"])
    status = pool.trigger_status(cfg, last(100), now=NOW)
    assert status.triggered and status.triggers["volume"] and status.new_train_samples == 50
    assert status.message == "fine-tune due (volume): 50/50 new train samples"


def test_the_first_fine_tune_counts_train_samples_too(overrides, tmp_path):
    # given no fine-tune yet and 60 verified samples, 35 of them train (the rest val and holdout)
    cfg = with_splits(overrides, tmp_path, ["train"] * 35 + ["val"] * 10 + ["holdout"] * 15)
    # then 60 verified samples do not start a fine-tune on 35
    status = pool.trigger_status(cfg, None, now=NOW)
    assert (status.new_samples, status.new_train_samples) == (60, 35) and not status.triggered


# --------------------------------------------------------------------------- performance


def test_one_new_sample_and_a_performance_flag_do_not_fine_tune(overrides, tmp_path):
    # given the monitor's flag raised after the last fine-tune, and one new train sample
    raise_flag(tmp_path, NOW - timedelta(hours=2))
    cfg = with_splits(overrides, tmp_path, ["train"] * 101)
    # when the policy is asked
    status = pool.trigger_status(cfg, last(100), now=NOW)
    # then the flag is due but held back by the floor, and the reason says so with the numbers
    assert not status.triggered and status.message == "waiting: 1/50 new train samples"
    performance = status.strategies["performance"]
    assert performance["enabled"] and performance["due"] and not performance["fired"]
    line = next(r for r in status.reasons if r.startswith("performance:"))
    assert "raised 2025-03-01T10:00:00Z: title detection rate 0.82 < 0.90" in line
    assert "held back by the floor: 1/50 new train samples" in line


def test_a_performance_flag_fires_at_the_floor_before_the_volume_threshold(overrides, tmp_path):
    # given volume raised to 200 and 60 new train samples
    cfg = with_splits(overrides, tmp_path, ["train"] * 160, "trigger.volume.min_new_samples=200")
    assert not pool.trigger_status(cfg, last(100), now=NOW).triggered  # volume alone waits for 200
    # when the monitor raises its flag
    raise_flag(tmp_path, NOW - timedelta(hours=2))
    status = pool.trigger_status(cfg, last(100), now=NOW)
    # then performance starts the fine-tune at the floor
    assert status.triggered and status.triggers == {
        "volume": False,
        "schedule": False,
        "performance": True,
        "force": False,
    }
    assert status.message == "fine-tune due (performance): 60/50 new train samples"


def test_a_flag_older_than_the_last_fine_tune_was_answered(overrides, tmp_path):
    # given a flag raised three days ago and a fine-tune registered since (a sweep leaves the flag in place)
    raise_flag(tmp_path, NOW - timedelta(days=3))
    cfg = with_splits(overrides, tmp_path, ["train"] * 160, "trigger.volume.min_new_samples=200")
    status = pool.trigger_status(cfg, last(100, days_ago=1), now=NOW)
    # then it starts nothing, and says which fine-tune answered it
    assert not status.triggered and not status.strategies["performance"]["due"]
    assert "answered by fine-tune v7" in status.strategies["performance"]["reason"]


def test_a_flag_without_raised_at_counts_from_its_file_time(overrides, tmp_path):
    flag = tmp_path / "flag.json"
    flag.write_text("not json")
    cfg = with_splits(overrides, tmp_path, ["train"] * 60)
    status = pool.trigger_status(cfg, None, now=NOW)
    assert status.triggers["performance"] and "is not readable JSON" in status.strategies["performance"]["reason"]


# --------------------------------------------------------------------------- schedule


@pytest.mark.parametrize(
    ("now", "due"),
    [
        (datetime(2025, 3, 2, 23, 59, 59, tzinfo=UTC), False),  # Sunday: still the fine-tune's week
        (datetime(2025, 3, 3, 0, 0, 0, tzinfo=UTC), True),  # Monday 00:00 UTC: a new period
        (datetime(2025, 3, 8, 12, 0, 0, tzinfo=UTC), True),  # later that week, while none was done in it
    ],
)
def test_schedule_only_fires_once_per_calendar_period(overrides, tmp_path, now, due):
    # given only the schedule (weekly from Monday 1970-01-05), a fine-tune on Tuesday 2025-02-25,
    # and 80 new train samples
    cfg = with_splits(overrides, tmp_path, ["train"] * 180, "trigger.strategies=[schedule]")
    tuesday = datetime(2025, 2, 25, 9, 0, 0, tzinfo=UTC)
    # when the policy is asked at `now`
    status = pool.trigger_status(cfg, last(100, at=tuesday), now=now)
    # then it fires only from the next Monday on, and volume never fires (it is off)
    assert status.triggered is due and status.triggers["schedule"] is due and not status.triggers["volume"]
    reason = status.strategies["schedule"]["reason"]
    assert "fine-tune v7 (2025-02-25T09:00:00Z, period 2877)" in reason
    assert ("due: period 2878" if due else "not due:") in reason


def test_schedule_does_not_fire_again_in_the_period_of_a_fine_tune(overrides, tmp_path):
    # given a fine-tune registered Monday 2025-03-03 10:00 (it answered that week's schedule)
    cfg = with_splits(overrides, tmp_path, ["train"] * 300, "trigger.strategies=[schedule]")
    monday = datetime(2025, 3, 3, 10, 0, 0, tzinfo=UTC)
    # then 200 new train samples later the same week still wait for the next period
    status = pool.trigger_status(cfg, last(100, at=monday), now=monday + timedelta(days=4))
    assert not status.triggered and status.message == "waiting: 200/50 new train samples, no strategy due (schedule)"
    assert pool.trigger_status(cfg, last(100, at=monday), now=monday + timedelta(days=7)).triggered


def test_schedule_at_a_boundary_still_needs_the_floor(overrides, tmp_path):
    cfg = with_splits(overrides, tmp_path, ["train"] * 130, "trigger.strategies=[schedule]")
    status = pool.trigger_status(cfg, last(100, days_ago=10), now=NOW)
    assert not status.triggered and status.strategies["schedule"]["due"]
    assert any(r.startswith("schedule: due: period") and "held back by the floor: 30/50" in r for r in status.reasons)


def test_schedule_fires_at_the_floor_before_the_volume_threshold(overrides, tmp_path):
    # given volume at 200 and a weekly schedule, 60 new train samples, the last fine-tune in an earlier week
    extra = ("trigger.strategies=[volume,schedule]", "trigger.volume.min_new_samples=200")
    cfg = with_splits(overrides, tmp_path, ["train"] * 160, *extra)
    status = pool.trigger_status(cfg, last(100, days_ago=10), now=NOW)
    assert status.triggered and [n for n, on in status.triggers.items() if on] == ["schedule"]
    # while volume alone, for the same pool and clock, waits
    cfg = with_splits(overrides, tmp_path, ["train"] * 160, "trigger.volume.min_new_samples=200")
    assert not pool.trigger_status(cfg, last(100, days_ago=10), now=NOW).triggered


def test_volume_fires_where_schedule_only_waits(overrides, tmp_path):
    # the same pool and clock (60 new train samples, a fine-tune earlier this week): volume decides otherwise
    volume = with_splits(overrides, tmp_path, ["train"] * 160)
    schedule = with_splits(overrides, tmp_path, ["train"] * 160, "trigger.strategies=[schedule]")
    assert pool.trigger_status(volume, last(100, days_ago=2), now=NOW).triggered
    assert not pool.trigger_status(schedule, last(100, days_ago=2), now=NOW).triggered


def test_the_clock_can_be_set_for_drills(overrides, tmp_path):
    cfg = with_splits(overrides, tmp_path, ["train"] * 60, "trigger.now=2025-03-03T00:00:00Z")
    assert pool.clock(cfg) == datetime(2025, 3, 3, tzinfo=UTC)
    assert pool.trigger_status(cfg, None).now == "2025-03-03T00:00:00+00:00"


# --------------------------------------------------------------------------- force, no strategy, bad config


def test_force_passes_the_floor_and_is_recorded(overrides, tmp_path):
    cfg = with_pool(overrides, tmp_path, 100, "trigger.force=true")
    status = pool.trigger_status(cfg, last(100), now=NOW)
    assert status.triggered and status.forced and status.new_train_samples == 0
    assert status.message == "forced: 0/50 new train samples (trigger.force=true)"
    assert "force: trigger.force=true starts a fine-tune regardless of the policy" in status.reasons


def test_with_no_strategy_only_force_starts_a_fine_tune(overrides, tmp_path):
    cfg = with_splits(overrides, tmp_path, ["train"] * 100, "trigger.strategies=[]")
    status = pool.trigger_status(cfg, None, now=NOW)
    assert (
        not status.triggered and status.message == "waiting: 100/50 new train samples, no strategy due (none enabled)"
    )


def test_a_disabled_strategy_records_only_that_it_is_off(overrides, tmp_path):
    # the record (mix.json) holds no time for a disabled schedule, so it is the same on every machine and day
    status = pool.trigger_status(with_splits(overrides, tmp_path, ["train"] * 10), None, now=NOW)
    assert "schedule: off (not in trigger.strategies)" in status.reasons
    assert not status.strategies["schedule"]["enabled"] and "period" in status.strategies["schedule"]["reason"]


@pytest.mark.parametrize(
    ("override", "problem"),
    [
        ("trigger.strategies=[volume,weekly]", "trigger.strategies: unknown strategy 'weekly'"),
        ("trigger.strategies=volume", "trigger.strategies='volume': must be a list"),
        ("trigger.min_train_samples=-1", "trigger.min_train_samples=-1: must be a whole number >= 1"),
        ("trigger.volume.min_new_samples=0", "trigger.volume.min_new_samples=0: must be a whole number >= 1"),
        ("trigger.schedule.every_days=-7", "trigger.schedule.every_days=-7: must be a number of days > 0"),
        ("trigger.schedule.origin=monday", "trigger.schedule.origin='monday': e.g. 2025-03-03T00:00:00Z"),
        ("trigger.now=soon", "trigger.now='soon': e.g."),
        ("trigger.force=maybe", "trigger.force='maybe': must be true or false"),
    ],
)
def test_a_bad_trigger_config_names_the_key(overrides, tmp_path, override, problem):
    cfg = with_pool(overrides, tmp_path, 10, override)
    for call in (lambda: pool.trigger_status(cfg, None), lambda: pool.trigger_state(cfg)):
        with pytest.raises(BadInput, match="bad trigger configuration") as info:
            call()
        assert any(p.startswith(problem) for p in info.value.problems), info.value.problems


# --------------------------------------------------------------------------- the trigger state (stage trigger)


def test_the_trigger_state_changes_at_a_period_boundary_and_with_a_new_flag_only(overrides, tmp_path):
    # given schedule and performance on, no flag yet
    cfg = compose([*overrides, "trigger.strategies=[volume,schedule,performance]"])
    state = pool.trigger_state(cfg, now=NOW)
    assert state == {
        "schedule": {"period": 2877, "starts": "2025-02-24T00:00:00Z"},
        "performance": {"flags": 0, "sha256": None},
    }
    # the same period later on: the same content (no time in it)
    assert pool.trigger_state(cfg, now=datetime(2025, 3, 2, 23, 59, 59, tzinfo=UTC)) == state
    # a new period: a new content
    assert pool.trigger_state(cfg, now=datetime(2025, 3, 3, tzinfo=UTC))["schedule"]["period"] == 2878
    # a flag raised: a new content; the fine-tune answering it (a rename) changes nothing
    raise_flag(tmp_path, NOW)
    flagged = pool.trigger_state(cfg, now=NOW)
    assert flagged["performance"]["flags"] == 1 and flagged["performance"]["sha256"]
    assert pool.consume_performance_flag(cfg, "8") == "title detection rate 0.82 < 0.90"
    assert pool.trigger_state(cfg, now=NOW) == flagged
    # a second flag: a new content again
    raise_flag(tmp_path, NOW + timedelta(days=1), reason="date detection rate 0.70 < 0.90")
    assert pool.trigger_state(cfg, now=NOW)["performance"]["flags"] == 2


def test_the_default_trigger_state_ignores_the_clock(overrides):
    cfg = compose(overrides)
    assert pool.trigger_state(cfg, now=NOW) == pool.trigger_state(cfg, now=NOW + timedelta(days=400))
    assert pool.trigger_state(cfg)["schedule"] is None  # schedule is off by default


# --------------------------------------------------------------------------- registry


def test_last_finetune_is_read_from_the_registry(cfg):
    # given a real SQLite MLflow store with a base and two fine-tune versions
    runs.setup(cfg)
    assert versions.last_finetune(cfg) is None  # no registered model yet
    client = mlflow.MlflowClient()
    name = cfg.mlflow.registered_model
    client.create_registered_model(name)
    source = Path(cfg.paths.build) / "model"
    source.mkdir(parents=True)
    client.create_model_version(name, str(source), tags={"kind": "base"})
    assert versions.last_finetune(cfg) is None  # a base is not a fine-tune
    client.create_model_version(name, str(source), tags={"kind": "finetune", "pool.size": "40"})
    newest = client.create_model_version(name, str(source), tags={"kind": "finetune", "pool.size": "90"})
    client.create_model_version(name, str(source), tags={"kind": "base"})
    # when the last fine-tune is looked up
    found = versions.last_finetune(cfg)
    # then it is the newest fine-tune version, with its pool size and creation time
    created = datetime.fromtimestamp(newest.creation_timestamp / 1000, UTC)
    assert found == {"version": "3", "pool_size": 90, "created": created.isoformat(timespec="seconds")}
    assert pool.trigger_status(cfg, found).new_samples == 0  # the tiny pool (12) is smaller than 90


def test_new_train_samples_count_the_rows_after_the_registered_pool_size(cfg):
    # given the tiny demo pool (12 rows) and a fine-tune registered on its first 5 rows
    rows = pool.pool_rows(cfg)
    status = pool.trigger_status(cfg, {"version": "2", "pool_size": 5, "created": "2025-01-01T00:00:00+00:00"})
    # then the rows after the first 5, and of those the train rows, are new
    assert status.new_samples == 7
    assert status.new_train_samples == sum(row["split"] == "train" for row in rows[5:])


def test_cli_pool_status(overrides, capsys):
    assert main(["pool", "status", "--json", *overrides]) == 0
    status = json.loads(capsys.readouterr().out)
    train = status["split_counts"]["train"]
    assert status["message"] == f"waiting: {train}/50 new train samples"
    assert status["pool_size"] == 12 and status["last_finetune"] is None and status["new_train_samples"] == train
    assert status["strategies"]["volume"] == {
        "enabled": True,
        "due": False,
        "fired": False,
        "reason": f"{train}/50 new train samples (trigger.volume.min_new_samples)",
    }
    assert status["retrain"]["due"] is False and status["retrain"]["threshold"] == 2000
    assert main(["pool", "status", "trigger.now=2025-03-01T12:00:00Z", *overrides]) == 0
    out = capsys.readouterr().out
    assert "pool: 12 verified samples" in out
    assert f"new: 12 samples, {train} of them train (no fine-tune yet: every sample is new)" in out
    assert f"floor: {train}/50 new train samples (trigger.min_train_samples): not met" in out
    assert f"[ ] volume      on   {train}/50 new train samples" in out
    assert "[ ] schedule    off  due: period 2877 (2025-02-24T00:00:00Z .. 2025-03-03T00:00:00Z" in out
    assert f"[ ] performance on   no flag ({overrides[-1].split('=', 1)[1]})" in out
    assert "[ ] force       off" in out and "now: 2025-03-01T12:00:00+00:00 (trigger.now)" in out
    assert "base retrain waiting: 12/2000 new verified samples since the anchor-only base" in out
