"""The README's pipeline commands on a copy of the repository, at tiny size.

`dvc repro`, a no-op re-run, edits to conf/ that rerun exactly the stages reading them, and the
five ways to start a stage (`dvc repro`, `python -m`, a Hydra sweep, `dvc exp run -S`,
`mlflow run`) all reaching the same value, read back from the MLflow run's params.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from ruamel.yaml import YAML

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TINY = {
    "conf/demo/default.yaml": {
        "anchor.train": 24,
        "anchor.val": 8,
        "anchor.test": 8,
        "failures.pool": 12,
        "failures.inbox": 4,
    },
    "conf/base/default.yaml": {"train.epochs": 1, "train.imgsz": 64, "train.batch": 8, "train.plots": False},
}


def set_yaml(path: Path, dotted: str, value) -> None:
    """Edit one value of a conf file in place, keeping its comments (as a user would)."""
    yaml = YAML()
    data = yaml.load(path.read_text())
    node = data
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = value
    with open(path, "w") as handle:
        yaml.dump(data, handle)


# what a user's fresh shell does not have: the test process's project, and the experiment and run that MLflow's
# fluent API writes into os.environ (`mlflow.set_experiment` sets MLFLOW_EXPERIMENT_ID) when an earlier test ran
# a stage in this process
FRESH_SHELL_UNSET = {
    "DETLOOP_ROOT",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_RUN_ID",
}


def sh(cwd: Path, *cmd: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in FRESH_SHELL_UNSET}
    full_env["PATH"] = f"{BIN}{os.pathsep}{full_env['PATH']}"
    full_env.update(env or {})
    done = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return done


def git(cwd: Path, *args: str) -> str:
    return sh(cwd, "git", "-c", "user.name=detloop-test", "-c", "user.email=test@detloop.invalid", *args).stdout


def copy_working_tree(dest: Path) -> Path:
    """The working tree's tracked and new files (uncommitted edits included) in ``dest``, set to tiny size."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    for conf, values in TINY.items():
        for key, value in values.items():
            set_yaml(dest / conf, key, value)
    return dest


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A copy of the working tree (tracked and new files) as its own git repo, set to tiny size."""
    dest = copy_working_tree(tmp_path_factory.mktemp("e2e") / "repo")
    git(dest, "init", "-q", "-b", "main")
    sh(dest, "detloop", "demo-data")
    sh(dest, "dvc", "add", "data")
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", "tiny copy")
    return dest


def store(repo: Path) -> str:
    return f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}"


def base_runs(repo: Path) -> list:
    mlflow.set_tracking_uri(store(repo))
    exp = mlflow.MlflowClient().get_experiment_by_name("detloop")
    runs = mlflow.search_runs([exp.experiment_id], filter_string="tags.stage = 'base'", output_format="list")
    return sorted((r for r in runs if r.data.tags.get("detloop.sweep") != "parent"), key=lambda r: r.info.start_time)


def versions(repo: Path) -> list:
    from detloop.core.config import compose
    from detloop.tracking import registry

    mlflow.set_tracking_uri(store(repo))
    return registry.versions(compose([], root=repo))


def stages_to_run(repo: Path) -> set[str]:
    """The stages `dvc status` finds changed, leaving out stage trigger: it is `always changed` (it reads the clock)."""
    status = json.loads(sh(repo, "dvc", "status", "--json").stdout or "{}")
    return {stage for stage, changes in status.items() if changes != ["always changed"]}


def stages_run(out: str) -> list[str]:
    """The stages a `dvc repro` ran, from its output."""
    return re.findall(r"Running stage '([^']+)'", out)


def test_dvc_repro_registers_a_base_with_base_and_production_aliases(repo):
    sh(repo, "dvc", "repro")
    rows = versions(repo)
    assert len(rows) == 1 and rows[0]["aliases"] == ["base", "production"]
    tags = rows[0]["tags"]
    head = git(repo, "rev-parse", "HEAD").strip()
    assert tags["lineage.git_commit"] == head
    data_md5 = YAML(typ="safe").load((repo / "data.dvc").read_text())["outs"][0]["md5"]
    assert tags["lineage.data_dvc_md5"] == data_md5
    run = mlflow.get_run(rows[0]["run_id"])
    assert run.data.params["base.train.epochs"] == "1"
    assert "final/metrics/mAP50B" in run.data.metrics
    assert "anchor_test/map50" in run.data.metrics
    metrics = json.loads((repo / "build" / "evaluate" / "metrics.json").read_text())
    assert metrics["model_version"] == "1"


def test_second_repro_without_changes_runs_nothing(repo):
    out = sh(repo, "dvc", "repro").stdout
    assert stages_run(out) == ["trigger"]  # it looks at the clock and the flag; its state is unchanged
    assert len(versions(repo)) == 1


def test_a_fresh_clone_reproduces_the_same_dvc_lock_and_stays_clean(repo, tmp_path):
    # given the pipeline's state committed, as a maintainer would after `dvc repro`
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "pipeline state")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    # when a newcomer writes the demo data and runs the pipeline in the clone (the `make demo` steps)
    sh(clone, "detloop", "demo-data")
    sh(clone, "dvc", "commit", "-f", "data.dvc")
    out = sh(clone, "dvc", "repro").stdout
    # then the models were trained and registered in the clone's own store, and git sees no change
    assert "Running stage 'base'" in out
    assert versions(clone)[0]["aliases"] == ["base", "production"]
    assert git(clone, "status", "--porcelain").strip() == ""


def test_reviewed_samples_rerun_mix_and_finetune_only(repo):
    # given the pipeline up to date, when a reviewer accepts every inbox report
    sh(repo, "detloop", "review", "accept", "--all", "--reviewer", "e2e-reviewer")
    # then data.dvc records the new pool version and only the stages reading the pool rerun
    assert "data.dvc" in git(repo, "status", "--porcelain")
    assert stages_to_run(repo) == {"mix", "gate"}  # the gate measures on the pool holdout
    out = sh(repo, "dvc", "repro").stdout
    assert "Running stage 'mix'" in out and "Running stage 'finetune'" in out
    assert "Running stage 'base'" not in out and "Running stage 'evaluate'" not in out
    assert "Running stage 'retrain'" not in out  # its input stays constant until a retrain is due
    # and with no fine-tune candidate the gate and promotion record that there was nothing to do
    assert json.loads((repo / "build" / "gate" / "decision.json").read_text())["skipped"]
    mix = json.loads((repo / "build" / "mix" / "mix.json").read_text())
    assert mix["pool_size"] == TINY["conf/demo/default.yaml"]["failures.pool"] + 4
    assert mix["trigger"].startswith("waiting:")  # below 50 new samples nothing is trained
    git(repo, "commit", "-q", "-am", "reviewed inbox")


def test_editing_evaluate_conf_reruns_only_evaluate_and_the_gate(repo):
    set_yaml(repo / "conf/evaluate/default.yaml", "batch", 4)
    assert stages_to_run(repo) == {"evaluate", "gate"}  # the gate measures with the evaluate settings
    out = sh(repo, "dvc", "repro").stdout
    assert "Running stage 'evaluate'" in out and "Running stage 'base'" not in out
    assert len(versions(repo)) == 1


def test_editing_base_conf_reruns_base_and_its_dependents_with_the_new_value(repo):
    set_yaml(repo / "conf/base/default.yaml", "train.lr0", 0.002)
    assert stages_to_run(repo) == {"base", "retrain"}  # evaluate follows from base's new lineage key
    # (retrain reads the base recipe; with no retrain due it records the wait and trains nothing)
    out = sh(repo, "dvc", "repro").stdout
    assert "Running stage 'base'" in out and "Running stage 'evaluate'" in out
    assert base_runs(repo)[-1].data.params["base.train.lr0"] == "0.002"
    assert [v["version"] for v in versions(repo)] == ["2", "1"]
    git(repo, "commit", "-q", "-am", "lr0 0.002")


def test_python_module_override_reaches_the_run(repo):
    sh(repo, "python", "-m", "detloop.base", "base.train.lr0=0.005")
    assert base_runs(repo)[-1].data.params["base.train.lr0"] == "0.005"


def test_hydra_sweep_logs_one_child_run_per_job_under_one_parent(repo):
    before = len(base_runs(repo))
    sh(repo, "python", "-m", "detloop.base", "-m", "base.train.lr0=0.006,0.007")
    runs = base_runs(repo)[before:]
    assert sorted(r.data.params["base.train.lr0"] for r in runs) == ["0.006", "0.007"]
    parents = {r.data.tags.get("mlflow.parentRunId") for r in runs}
    assert len(parents) == 1 and None not in parents
    assert mlflow.get_run(parents.pop()).data.tags["detloop.sweep"] == "parent"


def test_dvc_exp_run_set_param_reaches_the_run(repo):
    sh(
        repo,
        "dvc",
        "exp",
        "run",
        "-S",
        "conf/base/default.yaml:train.lr0=0.003",
        env={
            "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@t.invalid",
            "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@t.invalid",
        },
    )
    assert base_runs(repo)[-1].data.params["base.train.lr0"] == "0.003"


def test_mlflow_run_entry_point_reaches_the_run(repo):
    sh(
        repo,
        "mlflow",
        "run",
        ".",
        "-e",
        "base",
        "--env-manager",
        "local",
        "--experiment-name",
        "detloop",
        "-P",
        "overrides=base.train.lr0=0.004",
        env={"MLFLOW_TRACKING_URI": store(repo)},
    )
    last = base_runs(repo)[-1]
    assert last.data.params["base.train.lr0"] == "0.004"
    assert last.data.params["overrides"] == "base.train.lr0=0.004"
