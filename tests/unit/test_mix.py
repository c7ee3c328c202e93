"""The replay mix follows the document's ratio table and never leaks holdout or test data."""

from __future__ import annotations

import json
import shutil

import pytest
from tests.conftest import register_version, tiny_overrides

from detloop.core.config import compose
from detloop.core.errors import BadInput
from detloop.data import pool
from detloop.data.mixing import build_mix, draw_replay, replay_multiplier, replay_seed, replay_size
from detloop.tracking import runs

TABLE = {10: 50, 50: 20, 200: 10, 500: 5}


@pytest.mark.parametrize(
    ("n_new", "multiplier", "old"),
    [(10, 50, 500), (50, 20, 1000), (200, 10, 2000), (500, 5, 2500), (800, 5, 3000), (3, 50, 150), (49, 50, 2450)],
)
def test_ratio_table_from_the_document(n_new, multiplier, old):
    # the document's rows: 10 -> 50x (500), 50 -> 20x (1,000), 200 -> 10x (2,000), 500+ -> 5x, cap 3,000
    assert replay_multiplier(n_new, TABLE) == multiplier
    assert replay_size(n_new, TABLE, 3000) == old


def test_the_configured_table_is_the_documents():
    cfg = compose([])
    assert dict(cfg.mix.ratios) == TABLE and cfg.mix.max_old == 3000


def test_replay_is_fresh_per_pool_version_and_repeatable_for_one():
    images = list(range(1000))
    a = draw_replay(images, 100, replay_seed(0, "pool-v1"))
    assert a == draw_replay(images, 100, replay_seed(0, "pool-v1"))
    assert a != draw_replay(images, 100, replay_seed(0, "pool-v2"))
    assert len(set(a)) == 100


def _trigger(n: int) -> pool.TriggerStatus:
    return pool.TriggerStatus(
        pool_size=n,
        split_counts={},
        new_samples=n,
        new_train_samples=n,
        min_train_samples=50,
        triggered=True,
        reasons=["test"],
        forced=False,
        message="test",
    )


@pytest.fixture
def project(tmp_path, tiny_data):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    overrides = tiny_overrides(tmp_path)
    overrides[1] = f"paths.data={data}"
    return compose(overrides), data


def test_mix_holds_pool_train_and_replay_but_never_holdout_or_test(project):
    cfg, data = project
    mix = build_mix(cfg, _trigger(12))
    train = {p.resolve() for p in mix["train"]}
    val = {p.resolve() for p in mix["val"]}
    rows = {r["id"]: r for r in pool.pool_rows(cfg)}
    for path in train | val:
        assert "/images/test/" not in path.as_posix()
        stem = path.stem
        if stem in rows:
            assert rows[stem]["split"] in ({"train"} if path in train else {"val"})
    new = [p for p in train if p.stem in rows]
    assert len(new) == mix["record"]["new_train"] == len(pool.pool_samples(cfg, "train"))
    assert mix["record"]["old_train"] == min(replay_size(len(new), TABLE, 3000), cfg.demo.anchor.train)


def test_mixing_without_old_data_is_refused(project):
    cfg, data = project
    shutil.rmtree(data / "anchor" / "images" / "train")
    with pytest.raises(BadInput, match="no old data"):
        build_mix(cfg, _trigger(12))


@pytest.mark.parametrize("state", ["missing", "empty"])
def test_no_pool_yet_waits_and_the_training_stages_record_the_skip(tmp_path, tiny_data, registry_overrides, state):
    # given a project with an anchor and a registry but no pool (missing) or an empty one (`anchor import`)
    from detloop import finetune, mix, retrain

    shutil.copytree(tiny_data, tmp_path / "data")
    shutil.rmtree(tmp_path / "data" / "pool")
    if state == "empty":
        (tmp_path / "data" / "pool").mkdir()
        (tmp_path / "data" / "pool" / "manifest.jsonl").write_bytes(b"")
    cfg = compose(registry_overrides)
    # when the mix, finetune and retrain stages run
    record = mix.run(cfg)
    skipped = [finetune.run(cfg), retrain.run(cfg)]
    # then the mix waits for 50 new train samples with empty lists, and both training stages skip
    assert not record["triggered"] and record["pool_size"] == 0
    assert record["trigger"] == "waiting: 0/50 new train samples"
    build = tmp_path / "build"
    assert (build / "mix" / "train.txt").read_text() == (build / "mix" / "val.txt").read_text() == ""
    assert all(result["skipped"] for result in skipped)
    # and each writes its DVC metric, so `dvc metrics show` loads every file
    for stage in ("finetune", "retrain"):
        assert json.loads((build / stage / "metrics.json").read_text()) == {"skipped": True}


# --------------------------------------------------------------------------- the trigger decision in mix.json


@pytest.fixture
def registry_project(tmp_path, tiny_data, registry_overrides):
    """The tiny demo data (pool of 12) with a registry of this test's own and a flag path under tmp."""
    shutil.copytree(tiny_data, tmp_path / "data")
    return [*registry_overrides, f"trigger.performance_flag={tmp_path / 'flag.json'}"]


def test_a_flag_and_one_new_sample_do_not_fine_tune(registry_project, tmp_path):
    from detloop import mix

    # given a fine-tune registered on the first 11 of the 12 pool rows, then the monitor's flag
    cfg = compose(registry_project)
    runs.setup(cfg)  # the registry the stage reads
    register_version(cfg, {"kind": "finetune", "pool.size": 11})
    flag = {"reason": "title detection rate 0.62 < 0.90", "raised_at": "2999-01-01T00:00:00Z"}
    (tmp_path / "flag.json").write_text(json.dumps(flag))
    # when the mix stage runs
    record = mix.run(cfg)
    # then it records the wait, the flag held back by the floor, and trains nothing
    new_train = int(pool.pool_rows(cfg)[11]["split"] == "train")
    assert not record["triggered"] and record["trigger"] == f"waiting: {new_train}/50 new train samples"
    assert (record["new_samples"], record["new_train_samples"], record["min_train_samples"]) == (1, new_train, 50)
    assert record["triggered_by"] == ""
    assert any(r.startswith("performance: flag") and "held back by the floor" in r for r in record["trigger_reasons"])
    assert (tmp_path / "build" / "mix" / "train.txt").read_text() == ""


def test_force_is_recorded_in_the_mix(registry_project, tmp_path):
    from detloop import mix

    record = mix.run(compose([*registry_project, "trigger.force=true"]))
    train = pool.split_counts(compose(registry_project))["train"]
    assert record["triggered"] and record["forced"] and record["triggered_by"] == "force"
    assert record["trigger"] == f"forced: {train}/50 new train samples (trigger.force=true)"
    saved = json.loads((tmp_path / "build" / "mix" / "mix.json").read_text())
    assert saved["forced"] is True and saved["new_train"] == train


def test_the_mix_record_does_not_change_with_the_clock(registry_project, tmp_path):
    # mix.json is a DVC output recorded in dvc.lock: with the default strategies it holds no time
    from detloop import mix

    written = []
    for now in ("2025-03-01T12:00:00Z", "2026-07-15T08:00:00Z"):
        mix.run(compose([*registry_project, f"trigger.now={now}"]))
        written.append((tmp_path / "build" / "mix" / "mix.json").read_text())
    assert written[0] == written[1]
