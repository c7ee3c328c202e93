"""A Hydra sweep through `submitit_slurm` on a real single-node SLURM (Debian's slurmctld, slurmd, munge).

`detloop team up --slurm` starts the cluster beside the MLflow server; a 2-job sweep of the tiny base
stage is submitted with `hydra/launcher=submitit_slurm`, both jobs run as SLURM jobs at the same time
against the server, and the MLflow UI gets one parent run with both jobs as children, each job's run
naming its SLURM job.
"""

from __future__ import annotations

import re

import mlflow
import pytest
from tests.e2e.test_pipeline import copy_working_tree, git, sh

pytestmark = pytest.mark.team


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from detloop.team.slurm import SlurmUnavailable
    from detloop.team.stack import TeamStack

    try:
        stack = TeamStack.up(tmp_path_factory.mktemp("team") / "stack", slurm=True)
    except SlurmUnavailable as err:  # only when apt-get cannot install Debian's SLURM here
        pytest.skip(f"no SLURM on this machine: {err}")
    with stack, pytest.MonkeyPatch.context() as patch:  # the test's own reads of the server, as the admin
        patch.setenv("MLFLOW_TRACKING_USERNAME", stack.env["MLFLOW_TRACKING_USERNAME"])
        patch.setenv("MLFLOW_TRACKING_PASSWORD", stack.env["MLFLOW_TRACKING_PASSWORD"])
        yield stack


def test_a_two_job_sweep_runs_as_slurm_jobs_under_one_parent_run(cluster, tmp_path):
    repo = copy_working_tree(tmp_path / "repo")
    git(repo, "init", "-q", "-b", "main")
    sh(repo, "detloop", "demo-data")
    sweep = sh(
        repo,
        "python",
        "-m",
        "detloop.base",
        "-m",
        "hydra/launcher=submitit_slurm",
        f"hydra.launcher.partition={cluster.state['settings']['slurm']['partition']}",
        "hydra.launcher.timeout_min=15",
        "hydra.launcher.cpus_per_task=1",
        "base.train.lr0=0.01,0.02",
        env=cluster.env,
    )
    # both jobs went through SLURM as one job array: submitit keeps a folder per array task (<job>_<task>)
    jobs = sorted(p.name for p in repo.glob("build/hydra/multirun/*/*/.submitit/*") if re.fullmatch(r"\d+_\d+", p.name))
    assert len(jobs) == 2, sweep.stdout + sweep.stderr
    mlflow.set_tracking_uri(cluster.mlflow_uri)
    exp = mlflow.MlflowClient().get_experiment_by_name("detloop")
    runs = mlflow.search_runs([exp.experiment_id], filter_string="tags.stage = 'base'", output_format="list")
    parents = [r for r in runs if r.data.tags.get("detloop.sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert sorted(c.data.params["base.train.lr0"] for c in children) == ["0.01", "0.02"]
    assert sorted(c.data.tags.get("cluster.slurm_job_id", "") for c in children) == jobs
    assert all(c.info.status == "FINISHED" for c in children)
