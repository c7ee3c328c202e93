"""Stages `mix` and `finetune` on the tiny demo: from the base alias, registered, no alias moves."""

from __future__ import annotations

import json
import shutil

import mlflow
import pytest
from tests.conftest import tiny_overrides

from detloop.base import run as run_base
from detloop.core.config import compose
from detloop.core.errors import BadInput
from detloop.finetune import run as run_finetune
from detloop.mix import run as run_mix
from detloop.tracking import registry

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_data):
    """Given a tiny project with a registered base model."""
    base = tmp_path_factory.mktemp("finetune")
    shutil.copytree(tiny_data, base / "data")
    overrides = tiny_overrides(base)
    run_base(compose(overrides))
    return overrides, base


def test_below_the_volume_threshold_nothing_is_trained(project):
    overrides, base = project
    record = run_mix(compose(overrides))
    assert not record["triggered"]
    assert record["trigger"].startswith("waiting:")
    result = run_finetune(compose(overrides))
    assert result["skipped"]
    assert [v["version"] for v in registry.versions(compose(overrides))] == ["1"]
    assert (base / "build" / "mix" / "train.txt").read_text() == ""


def test_forced_finetune_starts_from_base_and_moves_no_alias(project):
    overrides, base = project
    cfg = compose([*overrides, "trigger.force=true"])
    record = run_mix(cfg)
    assert record["triggered"] and record["forced"]
    flag = base / "build" / "trigger" / "performance.json"  # the monitor raised the performance trigger
    flag.parent.mkdir(parents=True, exist_ok=True)
    flag.write_text(json.dumps({"reason": "detection rate of title 0.62 < 0.90"}))
    result = run_finetune(cfg)
    assert result["version"] == "2" and result["base_version"] == "1"
    rows = {v["version"]: v for v in registry.versions(cfg)}
    assert rows["2"]["aliases"] == []
    assert rows["1"]["aliases"] == ["base", "production"]
    tags = rows["2"]["tags"]
    assert tags["kind"] == "finetune" and tags["base_version"] == "1" and tags["forced"] == "true"
    assert int(tags["pool.size"]) == record["pool_size"]
    assert tags["pool.manifest_sha256"] == record["pool_manifest_sha256"]
    assert "lineage.git_commit" in tags and "lineage.config_hash" in tags
    run = mlflow.get_run(result["run_id"])
    assert run.data.tags["stage"] == "finetune" and run.data.tags["forced"] == "true"
    assert run.data.params["finetune.train.lr0"] == "0.001"
    assert run.data.params["finetune.train.freeze"] == "10"
    assert run.data.params["mixed.multiplier"] == str(record["multiplier"])
    assert run.data.params["mixed.seed"] == str(record["seed"])
    listed = {a.path for a in mlflow.MlflowClient().list_artifacts(result["run_id"], "mix")}
    assert {"mix/train.txt", "mix/val.txt", "mix/mix.json"} <= listed
    written = json.loads((base / "build" / "finetune" / "model.json").read_text())
    assert written["version"] == "2"
    # the fine-tune answered the performance flag: it is kept as a record, no longer set
    assert not flag.exists() and (flag.parent / "performance.consumed-v2.json").is_file()
    assert tags["trigger.performance_flag"] == "detection rate of title 0.62 < 0.90"


def test_finetuning_from_a_finetuned_version_is_refused(project):
    overrides, _ = project
    cfg = compose([*overrides, "trigger.force=true", "finetune.base_version=2"])
    with pytest.raises(BadInput, match="never chain"):
        run_finetune(cfg)
