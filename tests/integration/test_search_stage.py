"""Stage `search` on the tiny demo: when the fine-tune did not pass Gate 2, a gated Optuna sweep of the
recipe runs, every trial a child run fine-tuned from the base with replay, and the best passing trial takes
`staging` (never production) with a report comparing the trials.

Tiny models learn nothing in one epoch, so the test moves the Gate 2 line between the gate and the search:
the gate runs with a line nothing can pass (the guide's candidate goes to review), the search with a line
every trial passes; which trial wins is then decided by the real measured figures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import mlflow
import pytest
from tests.conftest import ROOT, mlflow_server, tiny_overrides
from tests.integration.test_mlflow_ui import assert_not_blank, render

from detloop.base import run as run_base
from detloop.core.config import compose
from detloop.finetune import run as run_finetune
from detloop.gate import run as run_gate
from detloop.mix import run as run_mix
from detloop.promote import run as run_promote
from detloop.tracking import registry

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SPACE = [  # two quick trials: lr0 and the replay share searched, the rest of the recipe as configured
    "search.trials=2",
    "~search.space.train.freeze",
    "~search.space.train.epochs",
    "~search.space.train.imgsz",
    "search.space.train.lr0='interval(0.001, 0.01)'",
]


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_data):
    """A tiny project whose forced fine-tune (v2) was gated to review and staged by the promote stage."""
    base = tmp_path_factory.mktemp("search")
    shutil.copytree(tiny_data, base / "data")
    overrides = [*tiny_overrides(base), "trigger.force=true"]
    run_base(compose(overrides))
    cfg = compose(overrides)
    run_mix(cfg)
    run_finetune(cfg)
    run_gate(compose([*overrides, "gate.new_samples.pass_above=1.0"]))  # nothing passes: review
    run_promote(cfg)
    return overrides, base


def stage(overrides: list[str], *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-m", "detloop.search", *overrides, *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )


def test_a_gate_2_failure_runs_gated_trials_and_stages_the_best_passing_one(project):
    overrides, base = project
    cfg = compose(overrides)
    name = cfg.mlflow.registered_model
    assert registry.alias_holder(name, "staging") == "2" and registry.alias_holder(name, "production") == "1"
    # when the search stage runs with a Gate 2 line the trials can pass
    done = stage(overrides, *SPACE, "gate.new_samples.pass_above=-1.0")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((base / "build" / "search" / "result.json").read_text())
    # then two trials ran as children of one parent run, each from the base, with replay, gated against v1
    assert result["searched"] and result["trials_run"] == 2
    trials = result["trials"]
    assert sorted(t["trial"] for t in trials) == [0, 1]
    # the first trial is the next recipe (lr0 x10 within its bound, the replay share as configured)
    first = next(t for t in trials if t["trial"] == 0)["recipe"]
    assert first["finetune.train.lr0"] == pytest.approx(0.01) and first["finetune.replay.scale"] == 1.0
    parent = mlflow.get_run(result["parent_run_id"])
    for t in trials:
        run = mlflow.get_run(t["run_id"])
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        mv = registry.client().get_model_version(name, t["version"])
        assert mv.tags["base_version"] == "1" and mv.tags["gate.reference_version"] == "1"
        assert 0.5 <= float(run.data.params["finetune.replay.scale"]) <= 1.0
        assert int(run.data.params["trained.replay_pages"]) >= 1  # always with replay
        assert 0.001 <= t["recipe"]["finetune.train.lr0"] <= 0.01
        assert t["decision"] in ("pass", "review", "reject")
    # the best passing trial (highest Gate 2 rate, then smallest drop) takes staging; production is untouched
    passing = [t for t in trials if t["decision"] == "pass"]
    assert passing, trials
    best = min(passing, key=lambda t: (-t["detection_rate"], t["drop"], int(t["version"])))
    assert result["staged"]["version"] == best["version"]
    assert registry.alias_holder(name, "staging") == best["version"]
    assert registry.alias_holder(name, "production") == "1"
    moves = [m for m in registry.history(cfg) if m["alias"] == "staging"]
    assert moves[-1]["to_version"] == best["version"] and "recipe search" in moves[-1]["why"]
    # and the comparison (table + plot) is in the parent run and the staged trial's run
    client = mlflow.MlflowClient()
    for run_id in (parent.info.run_id, best["run_id"]):
        listed = {a.path for a in client.list_artifacts(run_id, "search")}
        assert {"search/report.md", "search/trials.png", "search/trials.json"} <= listed
    report = (base / "build" / "search" / "report.md").read_text()
    assert f"v{best['version']} **(staging)**" in report and "| guide | v2 |" in report
    assert "hydra/sweeper=optuna" in report
    assert parent.data.tags["search.best_version"] == best["version"]
    # the stage's DVC outputs are its own: the trials wrote into their job folders, not over build/finetune
    assert json.loads((base / "build" / "finetune" / "model.json").read_text())["version"] == "2"
    for t in trials:
        assert (base / "build" / "search" / "recipe-search" / str(t["trial"]) / "trial.json").is_file()


def test_the_mlflow_ui_compares_the_trials_under_their_parent_run(project, tmp_path):
    """What a reviewer opens: the parent run (the report as its description) and its trials compared."""
    overrides, base = project
    parent_file = base / "build" / "search" / "recipe-search" / "mlflow_parent_run.json"
    parent_id = json.loads(parent_file.read_text())["run_id"]
    client = mlflow.MlflowClient()
    parent = client.get_run(parent_id)
    experiment = parent.info.experiment_id
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert len(children) == 2
    store = base / "mlruns"
    with mlflow_server(store / "mlflow.db", store / "artifacts", tmp_path / "ui.log", proxied=False) as ui:
        ids = ",".join(f'"{r.info.run_id}"' for r in children)
        png = tmp_path / "search_compare.png"
        dom = render(f'{ui}/#/compare-runs?runs=[{ids}]&experiments=["{experiment}"]', png, "1600,2400", tmp_path / "p")
        print(f"screenshot: {png}")
        assert_not_blank(png)
        assert "Comparing 2 Runs" in dom
        assert "finetune.train.lr0" in dom and "finetune.replay.scale" in dom  # the recipes side by side
        assert "gate.new_samples.detection_rate" in dom  # and what each trial scored
        png = tmp_path / "search_parent.png"
        dom = render(f"{ui}/#/experiments/{experiment}/runs/{parent_id}", png, "1600,1400", tmp_path / "p")
        print(f"screenshot: {png}")
        assert_not_blank(png)
        assert "Recipe search" in dom and "Best passing trial" in dom  # the report is the parent's description


def test_suggest_mode_names_the_next_recipe_and_off_does_nothing(project):
    overrides, base = project
    done = stage(overrides, "search.mode=suggest")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((base / "build" / "search" / "result.json").read_text())
    assert result["due"] and not result["searched"]
    # conf/finetune (freeze 10, lr0 0.001, 10 epochs at 160 px, all replay) -> backbone freed, lr0 x10
    assert result["next_recipe"] == {
        "finetune.train.freeze": 0,
        "finetune.train.lr0": 0.01,
        "finetune.train.epochs": 10,
        "finetune.train.imgsz": 160,
        "finetune.replay.scale": 1.0,
    }
    assert "python -m detloop.finetune -m hydra/sweeper=optuna" in (base / "build" / "search" / "report.md").read_text()
    done = stage(overrides, "search.mode=off")
    assert done.returncode == 0
    assert not json.loads((base / "build" / "search" / "result.json").read_text())["searched"]


def test_a_search_space_that_breaks_a_rule_is_refused_by_key(project):
    overrides, _ = project
    done = stage(overrides, "+search.space.start={base_version: 'choice(1, 2)'}")
    said = done.stdout + done.stderr
    assert done.returncode == 2
    assert "search.space.start: only the groups train" in said and "Traceback" not in said
    done = stage(overrides, "+search.space.train.seed='choice(0, 1)'")
    assert done.returncode == 2 and "search.space.train.seed" in done.stdout + done.stderr
    done = stage(overrides, "search.space.train.lr0='interval(0.001'")
    said = done.stdout + done.stderr
    assert done.returncode == 2 and "search.space.train.lr0" in said and "Traceback" not in said
