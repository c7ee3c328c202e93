"""Stage `retrain` on the tiny demo: due only at the threshold, anchor + pool, a candidate that moves no alias."""

from __future__ import annotations

import json
import shutil

import mlflow
import pytest
from tests.conftest import tiny_overrides

from detloop.base import run as run_base
from detloop.core.config import compose
from detloop.data import pool
from detloop.mix import run as run_mix
from detloop.retrain import run as run_retrain
from detloop.tracking import registry, versions

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_data):
    """Given a tiny project (pool of 12 verified samples) with a registered anchor-only base."""
    base = tmp_path_factory.mktemp("retrain")
    shutil.copytree(tiny_data, base / "data")
    overrides = tiny_overrides(base)
    run_base(compose(overrides))
    return overrides, base


def retrain_input(base) -> dict:
    return json.loads((base / "build" / "mix" / "retrain.json").read_text())


def test_below_the_threshold_nothing_is_retrained_and_the_input_stays_constant(project):
    overrides, base = project
    run_mix(compose(overrides))
    assert retrain_input(base) == {"due": False, "threshold": 2000}
    result = run_retrain(compose(overrides))
    assert result["skipped"] and "fewer than 2000" in result["reason"]
    assert [v["version"] for v in registry.versions(compose(overrides))] == ["1"]
    # and its DVC metric says so (a missing file makes `dvc metrics show` report a failure)
    assert json.loads((base / "build" / "retrain" / "metrics.json").read_text()) == {"skipped": True}


def test_at_the_threshold_a_new_base_is_trained_on_anchor_and_pool_and_awaits_the_gates(project):
    overrides, base = project
    cfg = compose([*overrides, "retrain.threshold=10"])
    # when the mix sees 12 >= 10 new samples since the anchor-only base
    record = run_mix(cfg)
    due = retrain_input(base)
    assert due["due"] and due["pool_size"] == 12 and due["since_base_version"] == "1"
    assert record["retrain"].startswith("base retrain due: 12 >= 10")
    # then the retrain stage trains from scratch on anchor train + pool train, validated with pool val
    result = run_retrain(cfg)
    assert result["version"] == "2"
    train = (base / "build" / "retrain" / "train.txt").read_text().splitlines()
    val = (base / "build" / "retrain" / "val.txt").read_text().splitlines()
    pool_train = {str(p.resolve()) for p in pool.pool_samples(cfg, "train")}
    holdout = {str(p.resolve()) for p in pool.pool_samples(cfg, "holdout")}
    assert pool_train and pool_train <= set(train)
    assert len(train) == 24 + len(pool_train)  # tiny anchor train + every pool train sample
    assert not holdout & (set(train) | set(val))
    assert not any("/images/test/" in line for line in train + val)
    # and registers a candidate: kind=base, retrain=true, with its pool; no alias moves
    rows = {v["version"]: v for v in registry.versions(cfg)}
    assert rows["2"]["aliases"] == [] and rows["1"]["aliases"] == ["base", "production"]
    tags = rows["2"]["tags"]
    assert tags["kind"] == "base" and tags["retrain"] == "true" and tags["pool.size"] == "12"
    assert tags["pool.manifest_sha256"] == due["pool_manifest_sha256"]
    run = mlflow.get_run(result["run_id"])
    assert run.data.tags["stage"] == "retrain"
    assert run.data.params["data.pool_train"] == str(len(pool_train))
    assert run.data.params["retrain.train.epochs"] == "1"  # the base recipe, tiny experiment
    # and the next mix counts new samples from the new base: nothing is due any more
    run_mix(cfg)
    assert retrain_input(base) == {"due": False, "threshold": 10}
    assert versions.last_base(cfg) == {"version": "2", "pool_size": 12}
