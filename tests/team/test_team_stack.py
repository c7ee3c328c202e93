"""The local team stack for real: PostgreSQL, moto S3, MLflow with basic auth, single-node SLURM, and the roles.

One stack per module (about 10-20 s to start); SLURM is part of it when apt-get can provide it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from detloop.core.config import compose
from detloop.core.errors import BadInput, PermissionRefused
from detloop.team import access, process, slurm
from detloop.team.stack import ENV_FILE, SECRETS_FILE, STATE_FILE, StackFailed, TeamStack, status

pytestmark = pytest.mark.team

BIN = Path(sys.executable).parent
USERS = {  # name -> (role, password): MLflow wants at least 12 characters
    "rhea": ("reader", "reader-password-1"),
    "tom": ("trainer", "trainer-password-1"),
    "rita": ("reviewer", "reviewer-password-1"),
}


def commands_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain ``text`` (ports, folders of a stack)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            with contextlib.suppress(OSError):
                if (entry / "stat").read_text().rpartition(")")[2].split()[0] == "Z":
                    continue
                line = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if text in line:
                    found.append(f"{entry.name}: {line}")
    return found


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The stack of this module, with SLURM when apt-get can install it (else ``slurm_skip`` says why)."""
    import mlflow

    folder = tmp_path_factory.mktemp("team")
    try:
        slurm.ensure_installed(folder / "slurm-apt.log")
        skip = ""
    except slurm.SlurmUnavailable as err:
        skip = f"SLURM unavailable here: {err}"
    saved_uri = os.environ.get("MLFLOW_TRACKING_URI")
    with TeamStack.up(folder, slurm=not skip) as running:
        running.slurm_skip = skip
        yield running
    mlflow.set_tracking_uri(saved_uri)  # access.* pointed MLflow (and its env var) at the stack


@pytest.fixture(scope="module")
def cfg(stack):
    return compose([f"mlflow.tracking_uri={stack.mlflow_uri}"])


@contextlib.contextmanager
def as_user(stack, name: str | None = None):
    """MLflow calls in the block made as ``name`` (default: the stack's admin)."""
    password = USERS[name][1] if name else stack.env["MLFLOW_TRACKING_PASSWORD"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_USERNAME", name or stack.env["MLFLOW_TRACKING_USERNAME"])
        patch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        yield


@pytest.fixture(scope="module")
def team(stack, cfg):
    """The experiments, the registered model and one user per role, made by the admin."""
    with as_user(stack):
        made = access.init(cfg)
        for name, (role, password) in USERS.items():
            access.add_user(cfg, name, role, password)
    return made


def s3_client(stack):
    import boto3

    env = stack.env
    return boto3.client(
        "s3",
        endpoint_url=stack.s3_endpoint,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )


def in_shell(stack, script: str, **extra: str) -> subprocess.CompletedProcess:
    """``script`` in bash with a clean environment plus ``source env.sh`` (and ``extra`` exported after it)."""
    exports = "".join(f"export {key}={shlex.quote(value)}; " for key, value in extra.items())
    env = {
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "HOME": os.environ.get("HOME", "/root"),
        "MLFLOW_DISABLE_TELEMETRY": "1",
    }
    command = f"set -e; source {stack.folder / ENV_FILE}; {exports}{script}"
    return subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=300)


# --------------------------------------------------------------------------- up


def test_every_service_answers_and_is_recorded(stack):
    import psycopg
    import requests

    with psycopg.connect(stack.pg_uri) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("mlflow",)
    buckets = {b["Name"] for b in s3_client(stack).list_buckets()["Buckets"]}
    assert {"detloop-artifacts", "detloop-dvc"} <= buckets
    assert requests.get(f"{stack.mlflow_uri}/health", timeout=5).ok
    assert requests.get(f"{stack.mlflow_uri}/api/2.0/mlflow/experiments/search", timeout=5).status_code == 401

    record = json.loads((stack.folder / STATE_FILE).read_text())
    names = [s["name"] for s in record["services"]]
    assert names[:3] == ["postgres", "s3", "mlflow"]
    assert all(s["pid"] > 0 and s["pgid"] > 0 for s in record["services"])
    assert status(stack.folder)["services"] and all(s["running"] for s in status(stack.folder)["services"])
    for private in (ENV_FILE, SECRETS_FILE, "mlflow-auth.ini"):
        assert stat.S_IMODE((stack.folder / private).stat().st_mode) == 0o600, private
    assert stack.env["MLFLOW_TRACKING_PASSWORD"] not in (stack.folder / STATE_FILE).read_text()


def test_a_second_up_is_refused(stack, capsys):
    from detloop.cli.main import main

    with pytest.raises(BadInput, match="already runs"):
        TeamStack.up(stack.folder)
    assert main(["team", "up", "--folder", str(stack.folder)]) == 2
    assert "already runs" in capsys.readouterr().err
    assert all(stack.running().values())


# --------------------------------------------------------------------------- clients through env.sh


def test_a_trainer_logs_an_artifact_through_the_proxy_into_the_bucket(stack, team):
    client = (
        "import mlflow, pathlib, tempfile\n"
        "mlflow.set_experiment('detloop')\n"
        "with mlflow.start_run() as run:\n"
        "    note = pathlib.Path(tempfile.mkdtemp()) / 'note.txt'\n"
        "    note.write_text('hello team')\n"
        "    mlflow.log_artifact(str(note))\n"
        "print(run.info.run_id)\n"
    )
    done = in_shell(
        stack,
        # the client needs no S3 access: the server proxies artifacts
        f"unset AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_ENDPOINT_URL; python -c {shlex.quote(client)}",
        MLFLOW_TRACKING_USERNAME="tom",
        MLFLOW_TRACKING_PASSWORD=USERS["tom"][1],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run_id = done.stdout.split()[-1]
    keys = [o["Key"] for o in s3_client(stack).list_objects_v2(Bucket="detloop-artifacts")["Contents"]]
    assert any(k.startswith("mlflow/") and k.endswith(f"{run_id}/artifacts/note.txt") for k in keys), keys


def test_dvc_pushes_to_the_stack_bucket_with_env_sh(stack, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "data.txt").write_text("a sample\n")
    done = in_shell(
        stack,
        f"cd {repo}; dvc init -q --no-scm; dvc remote add -d team {stack.state['dvc_remote']}; "
        "dvc add -q data.txt; dvc push -q",
        DVC_NO_ANALYTICS="1",
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    keys = [o["Key"] for o in s3_client(stack).list_objects_v2(Bucket="detloop-dvc")["Contents"]]
    assert any(k.startswith("dvc/files/md5/") for k in keys), keys


# --------------------------------------------------------------------------- roles


def test_roles_are_granted_once_and_listed(stack, cfg, team):
    assert set(team["experiments"]) == {"detloop", "detloop-registry-audit", "detloop-monitor"}
    with as_user(stack):
        again = access.add_user(cfg, "rhea", "reader", None)
        listed = {u["user"]: u["role"] for u in access.users(cfg)}
    assert not again["created"] and {g["outcome"] for g in again["grants"]} == {"kept"}
    assert listed == {"admin": "admin", "rhea": "reader", "tom": "trainer", "rita": "reviewer"}


def test_a_reader_cannot_write(stack, cfg, team):
    import mlflow

    from detloop.tracking import failures

    client = mlflow.MlflowClient(tracking_uri=stack.mlflow_uri)
    with as_user(stack, "rhea"):
        assert client.get_experiment(team["experiments"]["detloop"]).name == "detloop"  # READ reads
        with pytest.raises(mlflow.exceptions.MlflowException) as raw:
            client.create_run(team["experiments"]["detloop"])
        assert raw.value.get_http_status_code() == 403
        with pytest.raises(PermissionRefused, match="rhea"), failures.acting("creating a run"):
            client.create_run(team["experiments"]["detloop"])


def test_a_trainer_registers_and_may_set_an_alias_but_is_no_reviewer(stack, cfg, team):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=stack.mlflow_uri)
    model = cfg.mlflow.registered_model
    with as_user(stack, "tom"):
        run = client.create_run(team["experiments"]["detloop"])
        client.set_terminated(run.info.run_id)
        version = client.create_model_version(model, f"{run.info.artifact_uri}/model", run.info.run_id).version
        client.set_registered_model_alias(model, "staging", version)  # EDIT: MLflow cannot refuse it
        with pytest.raises(PermissionRefused, match=r"tom.*MANAGE|MANAGE.*tom") as refused:
            access.require_manage(cfg, "detloop promote")
    assert model in str(refused.value) and "detloop promote" in str(refused.value)
    with as_user(stack, "rita"):
        access.require_manage(cfg, "detloop promote")
    with as_user(stack):
        access.require_manage(cfg, "detloop rollback")
    access.require_manage(compose(["mlflow.tracking_uri=sqlite:////tmp/nowhere.db"]), "detloop promote")  # no users


def test_team_init_needs_the_admin(stack, cfg, team, capsys):
    from detloop.cli.main import main

    with as_user(stack, "rita"):
        with pytest.raises(PermissionRefused, match="rita"):
            access.init(cfg)
        assert main(["team", "users", f"mlflow.tracking_uri={stack.mlflow_uri}"]) == 3
    assert "not an admin" in capsys.readouterr().err


# --------------------------------------------------------------------------- SLURM


def test_slurm_runs_jobs_on_the_single_node(stack, tmp_path):
    if stack.slurm_skip:
        pytest.skip(stack.slurm_skip)
    assert slurm.node_state(Path(stack.slurm_conf)) == "idle"
    out = tmp_path / "batch.out"
    done = in_shell(stack, f"srun hostname; sbatch --wait -o {out} --wrap 'echo batch-ok'")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].strip()  # srun: the node's host name
    assert out.read_text().strip() == "batch-ok"


# --------------------------------------------------------------------------- down (last: it stops the module's stack)


def test_a_failed_start_stops_what_had_started(tmp_path, monkeypatch):
    started = []
    record = TeamStack._record
    monkeypatch.setattr(
        TeamStack, "_record", lambda self, proc, popen=None: (started.append(proc), record(self, proc, popen))
    )
    settings = compose(["team.timeouts.mlflow=1"]).team
    with pytest.raises(StackFailed, match=r"mlflow server did not answer .* see .*mlflow\.log"):
        TeamStack.up(tmp_path / "failing", settings=settings)
    assert [p.name for p in started] == ["postgres", "s3"]
    assert not any(process.members(p)[0] for p in started)
    assert not commands_mentioning(f"127.0.0.1:{started[0].port}/mlflow")  # the mlflow server
    assert not (tmp_path / "failing" / STATE_FILE).exists()


def test_down_stops_every_process_of_the_stack(stack):
    processes = {p.name: process.members(p)[0] for p in stack.services}
    assert all(processes.values())
    stopped = stack.down()
    assert sorted(stopped) == sorted(processes)
    assert not {name: process.wait_gone(pids, 0) for name, pids in processes.items() if process.wait_gone(pids, 0)}
    assert not commands_mentioning(str(stack.folder))
    assert not (stack.folder / STATE_FILE).exists() and not (stack.folder / ENV_FILE).exists()
    assert (stack.folder / "logs" / "mlflow.log").is_file()  # down removes nothing else
    assert stack.down() == []
