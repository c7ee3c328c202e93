"""The loop across two machines on the team stack: PostgreSQL + S3 (moto) + an authenticated `mlflow server`.

Clone A (a trainer) trains the tiny base with `dvc repro`, reviews the inbox into the pool (pushed to
the DVC remote on S3 automatically) and serves production. Clone B (another machine: its own git
clone, its own DVC cache, no MLflow store of its own) pulls the exact data, runs a fine-tune sweep
through Hydra's submitit launcher (2 jobs, each gated, one parent run), and a reviewer promotes the
best passing job; A's `detloop serve` picks it up through the server's proxied artifacts; a rollback
follows. A reader's promotion and a trainer's human decision are refused with the permission named.

The gate thresholds are opened for the sweep (tiny models at 64 px cannot reach the real bars): this
tests the wiring of the team setting, not model quality.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import mlflow
import pytest
import requests
import yaml
from tests.conftest import wait_healthy
from tests.e2e.test_pipeline import copy_working_tree, git, sh
from tests.serving_helpers import page_bytes

from detloop.core.env import free_port

pytestmark = pytest.mark.team

REMOTE = "team"
OPEN_GATES = ["gate.new_samples.pass_above=-1", "gate.regression.pass_below=100", "gate.regression.reject_above=100"]
USERS = {"tina": "trainer", "rev": "reviewer", "rita": "reader"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from detloop.team.stack import TeamStack

    with TeamStack.up(tmp_path_factory.mktemp("team") / "stack") as running:
        yield running


def login(stack, user: str | None = None) -> dict:
    """The environment of a machine of the team: the stack's endpoints, logged in as ``user`` (admin if None)."""
    env = dict(stack.env)
    if user is not None:
        env["MLFLOW_TRACKING_USERNAME"] = user
        env["MLFLOW_TRACKING_PASSWORD"] = f"{user}-password-1"
    return env


def configure_remote(repo: Path, stack) -> None:
    """The DVC remote: the URL is committed, the endpoint and keys of this machine stay in .dvc/config.local."""
    bucket = stack.state["dvc_remote"] if hasattr(stack, "state") else "s3://detloop-dvc/dvc"
    sh(repo, "dvc", "remote", "add", "-f", "-d", REMOTE, bucket)
    sh(repo, "dvc", "remote", "modify", "--local", REMOTE, "endpointurl", stack.s3_endpoint)
    sh(repo, "dvc", "remote", "modify", "--local", REMOTE, "access_key_id", stack.env["AWS_ACCESS_KEY_ID"])
    sh(repo, "dvc", "remote", "modify", "--local", REMOTE, "secret_access_key", stack.env["AWS_SECRET_ACCESS_KEY"])


@pytest.fixture(scope="module")
def team(stack, tmp_path_factory):
    """The admin's set-up: experiments and registered model created, the three users with their roles."""
    work = tmp_path_factory.mktemp("admin")
    admin = copy_working_tree(work / "repo")
    sh(admin, "detloop", "team", "init", env=login(stack))
    for user, role in USERS.items():
        env = {**login(stack), "DETLOOP_TEAM_PASSWORD": f"{user}-password-1"}
        sh(admin, "detloop", "team", "add-user", user, role, env=env)
    with pytest.MonkeyPatch.context() as patch:  # the test's own reads of the server, as the admin
        patch.setenv("MLFLOW_TRACKING_USERNAME", stack.env["MLFLOW_TRACKING_USERNAME"])
        patch.setenv("MLFLOW_TRACKING_PASSWORD", stack.env["MLFLOW_TRACKING_PASSWORD"])
        yield stack


@pytest.fixture(scope="module")
def clone_a(team, tmp_path_factory) -> Path:
    """Machine A: the project with the tiny demo data, the team profile as default and the DVC remote."""
    repo = copy_working_tree(tmp_path_factory.mktemp("machine-a") / "repo")
    config = yaml.safe_load((repo / "conf/config.yaml").read_text())
    assert {"mlflow": "default"} in config["defaults"]
    text = (repo / "conf/config.yaml").read_text().replace("  - mlflow: default", "  - mlflow: server")
    (repo / "conf/config.yaml").write_text(text)  # the team's repo: every stage (dvc repro too) needs the server
    git(repo, "init", "-q", "-b", "main")
    configure_remote(repo, team)
    sh(repo, "detloop", "demo-data")
    sh(repo, "dvc", "add", "-q", "data")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "team project, tiny data")
    return repo


def versions(stack) -> list[dict]:
    mlflow.set_tracking_uri(stack.mlflow_uri)
    client = mlflow.MlflowClient()
    found = [client.get_model_version("detloop-detector", v.version) for v in client.search_model_versions("")]
    return sorted(({"version": v.version, "aliases": list(v.aliases), "tags": v.tags} for v in found), key=_num)


def _num(row: dict) -> int:
    return int(row["version"])


def holder(stack, alias: str) -> str | None:
    mlflow.set_tracking_uri(stack.mlflow_uri)
    try:
        return mlflow.MlflowClient().get_model_version_by_alias("detloop-detector", alias).version
    except mlflow.exceptions.MlflowException:
        return None


def served(url: str) -> str:
    return str(requests.get(f"{url}/health", timeout=5).json()["version"])


def wait_for(check, what: str, timeout: float = 90.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if check():
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for: {what}")


def remote_has(stack, md5: str) -> bool:
    """True when the DVC remote on S3 holds the directory object of data version ``md5``."""
    s3 = boto3.client(
        "s3",
        endpoint_url=stack.s3_endpoint,
        aws_access_key_id=stack.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=stack.env["AWS_SECRET_ACCESS_KEY"],
        region_name=stack.env["AWS_DEFAULT_REGION"],
    )
    key = f"dvc/files/md5/{md5[:2]}/{md5[2:]}"
    return "Contents" in s3.list_objects_v2(Bucket="detloop-dvc", Prefix=key)


def data_md5(repo: Path) -> str:
    return yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]


def test_two_machines_share_data_runs_and_registry_through_the_team_stack(team, clone_a, tmp_path):
    trainer = login(team, "tina")
    # machine A trains and registers the base on the server (artifacts through its proxy into S3)
    sh(clone_a, "dvc", "repro", env=trainer)
    rows = versions(team)
    assert [(r["version"], sorted(r["aliases"])) for r in rows] == [("1", ["base", "production"])]
    assert remote_has(team, rows[0]["tags"]["lineage.data_dvc_md5"]), "the base's data version is on the remote"

    # A serves production, loading it from the server's proxied artifacts (no S3 keys on the client)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k not in {"DETLOOP_ROOT"}}
    env.update({k: v for k, v in trainer.items() if not k.startswith("AWS_")})
    port = free_port()
    log_path = tmp_path / "serve.log"
    serve = subprocess.Popen(
        [str(Path(sys.executable).parent / "detloop"), "serve", "--port", str(port), "serve.poll_seconds=1"],
        cwd=clone_a,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log_path.open("w"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, serve, "detloop serve", timeout=180, log=log_path)
        assert served(url) == "1"

        # A's reviewer accepts the inbox: the pool grows and is pushed to the remote at once
        out = sh(clone_a, "detloop", "review", "accept", "--all", "--reviewer", "ana", env=trainer)
        assert "push" in (out.stdout + out.stderr).lower()
        assert remote_has(team, data_md5(clone_a))
        git(clone_a, "commit", "-q", "-am", "reviewed inbox")

        # machine B: a git clone with its own cache gets the exact anchor + pool from the remote
        clone_b = tmp_path / "machine-b"
        git(tmp_path, "clone", "-q", str(clone_a), str(clone_b))
        configure_remote(clone_b, team)
        sh(clone_b, "dvc", "pull", "-q")
        assert (
            sh(clone_b, "dvc", "status").stdout.strip().endswith("up to date.")
            or "changed" not in sh(clone_b, "dvc", "status", "data.dvc").stdout
        )
        for name in ("pool/manifest.jsonl", "anchor/data.yaml", "inbox/manifest.jsonl"):
            assert (clone_b / "data" / name).read_bytes() == (clone_a / "data" / name).read_bytes(), name
        for row in versions(team):  # every registered version's data resolves from the remote
            assert remote_has(team, row["tags"]["lineage.data_dvc_md5"]), row["version"]

        # B: a fine-tune sweep through the submitit launcher: 2 jobs in parallel, each gated, one parent run
        b_trainer = login(team, "tina")
        sh(clone_b, "python", "-m", "detloop.mix", "trigger.force=true", env=b_trainer)
        sweep = sh(
            clone_b,
            "python",
            "-m",
            "detloop.finetune",
            "-m",
            "hydra/launcher=submitit_local",
            "hydra.launcher.timeout_min=20",
            "finetune.train.lr0=0.001,0.01",
            "finetune.train.epochs=1",
            "finetune.train.imgsz=64",
            "trigger.force=true",
            *OPEN_GATES,
            env=b_trainer,
        )
        assert "Traceback" not in sweep.stderr
        mlflow.set_tracking_uri(team.mlflow_uri)
        exp = mlflow.MlflowClient().get_experiment_by_name("detloop")
        runs = mlflow.search_runs([exp.experiment_id], filter_string="tags.stage = 'finetune'", output_format="list")
        parents = [r for r in runs if r.data.tags.get("detloop.sweep") == "parent"]
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
        assert len(parents) == 1 and len(children) == 2
        assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
        candidates = [r for r in versions(team) if r["tags"].get("kind") == "finetune"]
        assert len(candidates) == 2 and all(r["tags"].get("gate.decision") == "pass" for r in candidates)
        best = max(candidates, key=lambda r: float(r["tags"]["gate.new_samples.detection_rate"]))["version"]

        # a reader may not promote; a trainer may not take a human decision; nothing moves, nothing dangles
        reader = sh(
            clone_b,
            "detloop",
            "promote",
            best,
            "--reviewer",
            "rita",
            "--reason",
            "r",
            check=False,
            env=login(team, "rita"),
        )
        assert reader.returncode == 3, reader.stderr
        assert "needs MANAGE" in reader.stderr and "'rita' has READ" in reader.stderr
        assert "Traceback" not in reader.stderr
        refused = sh(
            clone_b,
            "detloop",
            "promote",
            best,
            "--reviewer",
            "tina",
            "--reason",
            "t",
            check=False,
            env=login(team, "tina"),
        )
        assert refused.returncode == 3 and "MANAGE" in refused.stderr and "Traceback" not in refused.stderr
        assert holder(team, "production") == "1"

        # the reviewer promotes the best passing job; A's serve swaps to it through the proxied artifacts
        sh(
            clone_b,
            "detloop",
            "promote",
            best,
            "--reviewer",
            "rev",
            "--reason",
            "best sweep job",
            env=login(team, "rev"),
        )
        assert holder(team, "production") == best
        wait_for(lambda: served(url) == best, f"serve on A swaps to v{best}")

        # and a rollback by the reviewer is picked up too
        sh(clone_b, "detloop", "rollback", "--reviewer", "rev", "--reason", "drill", env=login(team, "rev"))
        assert holder(team, "production") == "1"
        wait_for(lambda: served(url) == "1", "serve on A swaps back to v1")
        history = json.loads(sh(clone_b, "detloop", "registry", "--history", "--json", env=login(team, "rita")).stdout)
        assert history

        # the production side and the other ways in work against the server unchanged apart from the URI
        page = tmp_path / "reported.jpg"
        page.write_bytes(page_bytes(seed=4242))
        report = sh(clone_a, "detloop", "report", str(page), "--note", "stamp missed", env=trainer)
        assert "Traceback" not in report.stderr
        monitor = sh(clone_a, "detloop", "monitor", "--window-days", "7", check=False, env=trainer)
        assert monitor.returncode in (0, 1) and "Traceback" not in monitor.stderr, monitor.stderr[-3000:]
        assert mlflow.search_runs(experiment_names=["detloop-monitor"], output_format="list")
        inspect = sh(
            clone_a, "detloop", "inspect", "--model", "production", "--set", "anchor-test", "--json", env=trainer
        )
        assert json.loads(inspect.stdout), inspect.stderr[-2000:]
        sh(clone_a, "detloop", "inspect", "--stop-db", env=trainer)
        via_mlflow = sh(  # on A, where the base stage ran (B never trained a base: its evaluate refuses)
            clone_a,
            "mlflow",
            "run",
            ".",
            "-e",
            "evaluate",
            "--env-manager",
            "local",
            "--experiment-name",
            "detloop",
            env=trainer,
        )
        assert "Traceback" not in via_mlflow.stderr
    finally:
        serve.terminate()
        serve.wait(timeout=30)
