"""The tracking server dies while `dvc repro` trains the base: a clear failure DVC does not record as done.

A tiny project copy runs `dvc repro` against a real `mlflow server`; once the base stage's run is open
on the server, the server is killed. The stage exits 3 with a message naming the server (no
traceback), `dvc.lock` records no `base` stage, no alias exists; after the server comes back on the
same backend, `dvc repro` completes and the base holds `base` and `production`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from tests.conftest import kill_server, mlflow_server
from tests.e2e.test_pipeline import copy_working_tree, git, sh

pytestmark = pytest.mark.team

BIN = Path(sys.executable).parent


def open_base_run(uri: str) -> bool:
    mlflow.set_tracking_uri(uri)
    exp = mlflow.MlflowClient().get_experiment_by_name("detloop")
    if exp is None:
        return False
    running = "tags.stage = 'base' and attributes.status = 'RUNNING'"
    found = mlflow.MlflowClient().search_runs([exp.experiment_id], running)
    return bool(found)


def locked_stages(repo: Path) -> set[str]:
    lock = repo / "dvc.lock"
    return set((yaml.safe_load(lock.read_text()) or {}).get("stages", {})) if lock.is_file() else set()


def test_a_server_killed_during_the_base_stage_fails_it_clearly_and_a_rerun_completes(tmp_path):
    repo = copy_working_tree(tmp_path / "repo")
    git(repo, "init", "-q", "-b", "main")
    sh(repo, "detloop", "demo-data")
    sh(repo, "dvc", "add", "-q", "data")
    (repo / "dvc.lock").unlink(missing_ok=True)  # nothing recorded yet on this machine
    files = (tmp_path / "server.db", tmp_path / "artifacts", tmp_path / "server.log")
    with mlflow_server(*files) as uri:
        env = {k: v for k, v in os.environ.items() if k not in {"DETLOOP_ROOT"}}
        env.update(PATH=f"{BIN}:{env['PATH']}", MLFLOW_TRACKING_URI=uri)
        repro = subprocess.Popen(
            ["dvc", "repro"], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.time() + 300
        while not open_base_run(uri):
            assert repro.poll() is None, repro.stdout.read()
            assert time.time() < deadline, "the base stage never opened its run"
            time.sleep(0.3)
        kill_server(uri)  # while the base trains (its run is open on the server)
        out, _ = repro.communicate(timeout=300)
    assert repro.returncode != 0, out
    assert f"MLflow tracking server {uri}" in out and "Traceback" not in out, out[-3000:]
    assert "base" not in locked_stages(repo)  # DVC does not record the stage as done
    with mlflow_server(*files) as uri:  # the server back on the same backend
        mlflow.set_tracking_uri(uri)
        client = mlflow.MlflowClient()
        assert client.search_model_versions("") == [] or all(
            not client.get_model_version(v.name, v.version).aliases for v in client.search_model_versions("")
        )  # no alias was given while the server was gone
        sh(repo, "dvc", "repro", env={"MLFLOW_TRACKING_URI": uri})
        assert {"base", "evaluate"} <= locked_stages(repo)
        assert client.get_model_version_by_alias("detloop-detector", "production").version
        assert client.get_model_version_by_alias("detloop-detector", "base").version


def test_the_database_going_away_during_the_base_stage_fails_it_clearly_and_a_rerun_completes(tmp_path):
    from detloop.team.stack import TeamStack, _as_postgres

    repo = copy_working_tree(tmp_path / "repo")
    git(repo, "init", "-q", "-b", "main")
    sh(repo, "detloop", "demo-data")
    sh(repo, "dvc", "add", "-q", "data")
    (repo / "dvc.lock").unlink(missing_ok=True)
    with TeamStack.up(tmp_path / "stack") as stack, pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_USERNAME", stack.env["MLFLOW_TRACKING_USERNAME"])
        patch.setenv("MLFLOW_TRACKING_PASSWORD", stack.env["MLFLOW_TRACKING_PASSWORD"])
        postgres = stack.service("postgres")
        pg_ctl = [*_as_postgres(), "/usr/lib/postgresql/15/bin/pg_ctl", "-D", postgres.extra["data"]]
        env = {k: v for k, v in os.environ.items() if k not in {"DETLOOP_ROOT"}}
        env.update(stack.env, PATH=f"{BIN}:{env['PATH']}")
        repro = subprocess.Popen(
            ["dvc", "repro"], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.time() + 300
        while not open_base_run(stack.mlflow_uri):
            assert repro.poll() is None, repro.stdout.read()
            assert time.time() < deadline, "the base stage never opened its run"
            time.sleep(0.3)
        # the database stops while the base trains; the MLflow server stays up and answers with errors
        subprocess.run([*pg_ctl, "-m", "fast", "-w", "stop"], check=True, capture_output=True)
        out, _ = repro.communicate(timeout=600)
        assert repro.returncode != 0, out
        assert f"MLflow tracking server {stack.mlflow_uri}" in out and "Traceback" not in out, out[-3000:]
        assert "base" not in locked_stages(repo)  # DVC does not record the stage as done
        # the database comes back on the same data and port: the rerun completes
        options = f"-p {postgres.port} -k {postgres.extra['dir']} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(
            [*pg_ctl, "-l", str(Path(postgres.extra["dir"]) / "postgres.log"), "-o", options, "-w", "start"],
            check=True,
            capture_output=True,
            start_new_session=True,
        )
        try:  # this postmaster is not the one the stack recorded: the test stops it itself
            client = mlflow.MlflowClient()
            versions = client.search_model_versions("")
            assert all(not client.get_model_version(v.name, v.version).aliases for v in versions)
            sh(repo, "dvc", "repro", env=stack.env)
            assert {"base", "evaluate"} <= locked_stages(repo)
            assert client.get_model_version_by_alias("detloop-detector", "production").version
        finally:
            subprocess.run([*pg_ctl, "-m", "fast", "-w", "stop"], check=False, capture_output=True)
