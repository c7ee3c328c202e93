"""detloop on a shared MLflow server with many writers: refusals, races, parallel sweeps, a server that dies.

Real servers (``tests.conftest.mlflow_server``, with ``auth=True`` for MLflow's basic-auth app) and real
processes. A worker that must stop at a given moment (two people deciding at once; the server killed
while a move is under way) runs the real ``detloop`` command or stage with a pause wrapped around one
detloop function (:data:`HOOKED`); MLflow itself is never replaced.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from tests.conftest import AUTH_ADMIN, ROOT, kill_server, mlflow_server, register_version
from tests.integration.test_registry_faults import gated_versions, holder_snapshot, production_versions, start

from detloop.cli.main import main
from detloop.core.config import compose
from detloop.core.errors import PermissionRefused
from detloop.core.stage import stage_dir, write_json
from detloop.tracking import registry, runs, sweep

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Runs `detloop ARGS` (or the promote stage: `stage OVERRIDES`) with a pause at registry.<HOOK>: before the
# call for move_alias (the command has read the holder), after it for record_move (the audit run is open).
HOOKED = """
import sys
from detloop.tracking import registry
hook, argv = sys.argv[1], sys.argv[2:]
real = getattr(registry, hook)
def paused(*args, **kwargs):
    if hook == "record_move":
        result = real(*args, **kwargs)
        print("ready", flush=True)
        sys.stdin.readline()
        return result
    print("ready", flush=True)
    sys.stdin.readline()
    return real(*args, **kwargs)
setattr(registry, hook, paused)
if argv[0] == "stage":
    sys.argv = ["promote", *argv[1:]]
    from detloop.promote import main
    main()
else:
    from detloop.cli.main import main
    sys.exit(main(argv))
"""


def hooked(hook: str, *argv: str) -> subprocess.Popen:
    """A detloop process paused at ``registry.<hook>`` (returned once it is there; MLflow may print before)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOOKED, hook, *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = []
    while (line := proc.stdout.readline()) and line.strip() != "ready":
        seen.append(line)
    if not line:
        proc.kill()
        raise AssertionError(f"worker did not get to {hook}: {''.join(seen)[-2000:]} {proc.stderr.read()[-3000:]}")
    return proc


def resume(proc: subprocess.Popen) -> None:
    proc.stdin.write("go\n")
    proc.stdin.flush()


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    """Everything the process printed (stdout and stderr; a stage logs to stdout) once it exited."""
    out, err = proc.communicate(timeout=timeout)
    return out + err


def login(monkeypatch, user: str, password: str) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)


def write_pass(cfg, version: str, reference: str) -> None:
    """The gate's decision file: ``version`` (a fine-tune) passed against ``reference``."""
    write_json(
        stage_dir(cfg, "gate") / "decision.json",
        {
            "skipped": False,
            "decision": "pass",
            "summary": "pass",
            "candidate": {"name": cfg.mlflow.registered_model, "version": version, "kind": "finetune", "run_id": ""},
            "production": {"version": reference, "alias": "production"},
            "figures": {"gate.regression.drop": 0.1},
        },
    )


# --------------------------------------------------------------------------- 1. permissions


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """A real tracking server with MLflow's basic-auth app (default permission READ), shared by this module."""
    base = tmp_path_factory.mktemp("auth-server")
    with mlflow_server(base / "server.db", base / "artifacts", base / "server.log", auth=True) as uri:
        yield uri


PASSWORDS = {"rita": "rita-password-1", "sam": "sam-password-1", "alice": "alice-password-1"}


def run_stage_as(user: str, overrides: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """``python -m detloop.promote`` as ``user`` (the stage acts on build/gate/decision.json)."""
    env = {**os.environ, "MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": PASSWORDS[user]}
    return subprocess.run(
        [sys.executable, "-m", "detloop.promote", *overrides, f"hydra.run.dir={tmp_path / 'hydra'}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_permission_refusals_read_as_messages_and_leave_nothing_half_done(
    auth_server, registry_overrides, tmp_path, monkeypatch, capsys
):
    from mlflow.server import get_app_client

    from detloop.promote import run as run_promote

    overrides = [*registry_overrides, f"mlflow.tracking_uri={auth_server}"]
    login(monkeypatch, *AUTH_ADMIN)
    cfg = compose(overrides)
    runs.setup(cfg)
    v1, v2 = gated_versions(cfg, 1)
    name, audit = cfg.mlflow.registered_model, registry.audit_experiment_id(cfg)
    admin = get_app_client("basic-auth", auth_server)
    for user, password in PASSWORDS.items():
        admin.create_user(user, password)
    # rita: READ only (the default); sam: may write the audit trail, not the model; alice: a reviewer
    for user in ("sam", "alice"):
        admin.grant_user_permission(user, "experiment", audit, "EDIT")
    admin.grant_user_permission("alice", "registered_model", name, "MANAGE")
    write_pass(cfg, v2, v1)
    trail = len(registry.history(cfg))

    # when the promote stage runs as rita: refused when opening the audit record, exit 3, nothing written
    done = run_stage_as("rita", overrides, tmp_path)
    told = done.stdout + done.stderr
    assert done.returncode == 3, told[-3000:]
    assert f"MLflow server {auth_server} refused user 'rita' (permission denied)" in told
    assert f"opening the audit record of moving alias production of registered model {name}" in told
    assert f"needs EDIT on experiment {cfg.mlflow.audit_experiment}" in told and "Traceback" not in told
    assert holder_snapshot(cfg) == v1 and len(registry.history(cfg)) == trail
    # and `detloop promote` as rita: exit 3, a message naming her, nothing written
    login(monkeypatch, "rita", PASSWORDS["rita"])
    assert main(["promote", v2, "--reviewer", "rita", "--reason", "reviewed", *overrides]) == 3
    err = capsys.readouterr().err
    said = err.strip().splitlines()[-1]
    assert said.startswith("error: ") and "'rita'" in said and "Traceback" not in err, err
    login(monkeypatch, *AUTH_ADMIN)
    assert holder_snapshot(cfg) == v1 and len(registry.history(cfg)) == trail
    assert "rollback_to" not in registry.client().get_model_version(name, v2).tags

    # when the stage runs as sam: refused when tagging the version; his audit record is settled as refused
    login(monkeypatch, "sam", PASSWORDS["sam"])
    with pytest.raises(PermissionRefused) as refused:
        run_promote(cfg)
    assert f"refused user 'sam' (permission denied): tagging version {v2} of registered model {name}" in str(
        refused.value
    )
    assert f"needs EDIT on registered model {name}" in str(refused.value)
    login(monkeypatch, *AUTH_ADMIN)
    moves = registry.history(cfg)
    assert (
        holder_snapshot(cfg) == v1 and moves[-1]["state"] == "refused" and "refused user 'sam'" in moves[-1]["refusal"]
    )
    assert "pending" not in {m["state"] for m in moves} and "rollback_to" not in registry.versions(cfg)[0]["tags"]

    # a READ-only user still reads the registry and its history (the refused attempt shows)
    login(monkeypatch, "rita", PASSWORDS["rita"])
    assert main(["registry", "--history", *overrides]) == 0
    assert "[refused]" in capsys.readouterr().out
    # wrong credentials: a message too
    login(monkeypatch, "rita", "not-her-password")
    assert main(["registry", *overrides]) == 3
    assert "refused the credentials of user 'rita'" in capsys.readouterr().err

    # the reviewer may
    login(monkeypatch, "alice", PASSWORDS["alice"])
    assert main(["promote", v2, "--reviewer", "alice", "--reason", "reviewed", *overrides]) == 0
    assert holder_snapshot(cfg) == v2


# --------------------------------------------------------------------------- 3. two people promoting at once


def test_two_people_promoting_at_once_exactly_one_wins_and_both_attempts_are_recorded(server, registry_overrides):
    overrides = [*registry_overrides, f"mlflow.tracking_uri={server}"]
    cfg = compose(overrides)
    runs.setup(cfg)
    versions = gated_versions(cfg, 8)
    rounds = [(versions[i], versions[i + 1]) for i in range(1, 9, 2)]
    for number, targets in enumerate(rounds):
        # given alice and bob each read production and decided to promote their version
        reason = f"race {number}"
        people = {
            who: hooked("move_alias", "promote", target, "--reviewer", who, "--reason", reason, *overrides)
            for who, target in zip(("alice", "bob"), targets, strict=True)
        }
        before = holder_snapshot(cfg)
        staggered = number == len(rounds) - 1  # the last round: alice finishes before bob's move starts
        # when both go ahead at the same moment (or alice first)
        for who, proc in people.items():
            resume(proc)
            if staggered and who == "alice":
                proc.wait(timeout=300)
        output = {who: finish(proc) for who, proc in people.items()}
        codes = {who: proc.returncode for who, proc in people.items()}
        # then exactly one wins, the other is refused (exit 2) and told who holds or is moving production
        assert sorted(codes.values()) == [0, 2], (codes, output)
        winner = next(who for who, code in codes.items() if code == 0)
        loser = next(who for who in people if who != winner)
        won = dict(zip(("alice", "bob"), targets, strict=True))[winner]
        assert holder_snapshot(cfg) == won and production_versions(cfg) == [won]
        told = output[loser]
        print(f"race {number}: {winner} won; {loser} was told: {told.strip().splitlines()[-1]}")
        assert "was refused and nothing changed" in told and "Traceback" not in told, told
        assert f"{winner} is moving it" in told or f"v{won} holds it now (given by {winner}" in told, told
        if staggered:
            assert winner == "alice" and f"changed since this command read it (v{before})" in told
        # and the audit trail has both attempts: the winner's move done, the loser's refused
        attempts = {m["who"]: m["state"] for m in registry.history(cfg) if m["why"] == reason}
        assert attempts == {winner: "done", loser: "refused"}
    assert "pending" not in {m["state"] for m in registry.history(cfg)}


# --------------------------------------------------------------------------- 4. the server goes away


def test_the_server_going_away_mid_move_exits_3_and_a_rerun_completes(tmp_path, registry_overrides):
    files = (tmp_path / "server.db", tmp_path / "artifacts", tmp_path / "server.log")
    with mlflow_server(*files) as uri:
        overrides = [*registry_overrides, f"mlflow.tracking_uri={uri}"]
        cfg = compose(overrides)
        runs.setup(cfg)
        v1, v2, v3 = gated_versions(cfg, 2)
        # given `detloop promote` with its audit run open, when the server dies
        worker = hooked("record_move", "promote", v2, "--reviewer", "rita", "--reason", "ok", *overrides)
        kill_server(uri)
        began = time.monotonic()
        resume(worker)
        told = finish(worker)
        print(f"after {time.monotonic() - began:.1f} s: {told.strip().splitlines()[-1]}")
        # then it stops within seconds: exit 3, one message naming the server and the move, no traceback
        assert worker.returncode == 3, told
        assert f"error: MLflow tracking server {uri} stopped answering while checking for other moves before " in told
        assert "moving alias production" in told and "Connection refused" in told and "Traceback" not in told
        assert time.monotonic() - began < 60
    with mlflow_server(*files) as uri:  # the server comes back on the same backend
        overrides = [*registry_overrides, f"mlflow.tracking_uri={uri}"]
        cfg = compose(overrides)
        runs.setup(cfg)
        assert production_versions(cfg) == [v1]  # no alias moved while it was gone
        # when the promote stage runs with its audit run open and the server dies again
        write_pass(cfg, v3, v1)
        hydra_dir = f"hydra.run.dir={tmp_path / 'hydra'}"
        worker = hooked("record_move", "stage", *overrides, hydra_dir)
        kill_server(uri)
        resume(worker)
        told = finish(worker)
        print(f"the stage: {told.strip().splitlines()[-1]}")
        assert worker.returncode == 3, told
        assert f"MLflow tracking server {uri} stopped answering" in told and "Traceback" not in told
    with mlflow_server(*files) as uri:
        overrides = [*registry_overrides, f"mlflow.tracking_uri={uri}"]
        cfg = compose(overrides)
        runs.setup(cfg)
        assert production_versions(cfg) == [v1]
        # when the human's promotion is run again: the dead attempts are settled and it completes
        assert main(["promote", v2, "--reviewer", "rita", "--reason", "again", *overrides]) == 0
        assert production_versions(cfg) == [v2]
        # and the stage, run again (its decision was measured against v1, which no longer serves), stages v3
        from detloop.promote import run as run_promote

        assert run_promote(cfg)["finetune"]["alias"] == "staging"
        assert production_versions(cfg) == [v2]
        states = [(m["who"], m["state"]) for m in registry.history(cfg) if m["alias"] == "production"]
        assert states[-3:] == [("rita", "interrupted"), (states[-2][0], "interrupted"), ("rita", "done")]


# --------------------------------------------------------------------------- 2. sweeps: one parent run


def sweep_runs(cfg, folder: Path) -> tuple[list, list]:
    """(parent runs, child runs) of the sweep in ``folder``."""
    found = mlflow.MlflowClient().search_runs(
        [mlflow.MlflowClient().get_experiment_by_name(cfg.mlflow.experiment).experiment_id],
        filter_string=f"tags.`{sweep.SWEEP_TAG}` = '{folder}'",
    )
    parents = [r for r in found if r.data.tags.get("detloop.sweep") == "parent"]
    return parents, [r for r in found if r not in parents]


def test_parallel_sweep_jobs_on_submitit_log_under_one_parent_run(server, tiny_project, tmp_path):
    overrides = [
        *tiny_project,
        f"mlflow.tracking_uri={server}",
        f"mlflow.registered_model=detector-{tmp_path.name}",
    ]
    folder = tmp_path / "sweep"
    # when a 2-job sweep of the base stage runs its jobs in separate processes at the same time
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "detloop.base",
            "-m",
            "base.train.lr0=0.01,0.02",
            "hydra/launcher=submitit_local",
            *overrides,
            f"hydra.sweep.dir={folder}",
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        capture_output=True,
        text=True,
        timeout=900,
    )
    logs = "\n".join(p.read_text()[-2000:] for p in sorted(folder.rglob("*_log.err")))
    assert done.returncode == 0, done.stderr[-3000:] + logs
    # then the launching process made one parent run, and both jobs are its children
    cfg = compose(overrides)
    runs.setup(cfg)
    record = json.loads((folder / sweep.PARENT_FILE).read_text())
    parents, children = sweep_runs(cfg, str(folder))
    assert [p.info.run_id for p in parents] == [record["run_id"]]
    assert len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {record["run_id"]}
    first, second = children
    assert first.info.start_time < second.info.end_time and second.info.start_time < first.info.end_time  # parallel
    # and of the two jobs racing for the first base (and with it production), exactly one took them
    name = cfg.mlflow.registered_model
    swept = sorted(str(v.version) for v in registry.client().search_model_versions(f"name='{name}'"))
    first = registry.alias_holder(name, "base")
    assert len(swept) == 2 and first in swept and production_versions(cfg) == [first]
    moves = registry.history(cfg)
    print("sweep moves:", [(m["alias"], m["to_version"], m["state"]) for m in moves])
    for alias in ("base", "production"):
        assert [m["state"] for m in moves if m["alias"] == alias and m["state"] != "refused"] == ["done"]


SWEEP_JOB = """
import sys
from detloop.core.config import compose
from detloop.tracking import runs, sweep
cfg = compose(sys.argv[2:])
experiment_id = runs.setup(cfg)
print("ready", flush=True)
sys.stdin.readline()  # all jobs start together
print(sweep.parent_run(experiment_id, sys.argv[1], "base"), flush=True)
"""


def test_sweep_jobs_without_the_parent_file_make_exactly_one_parent(tmp_path, registry_overrides):
    folder = tmp_path / "sweep"
    folder.mkdir()
    # when 4 jobs of a sweep whose launcher wrote no parent file ask for the parent at the same time
    jobs = [start(SWEEP_JOB, str(folder), *registry_overrides) for _ in range(4)]
    for job in jobs:
        resume(job)
    ids = []
    for job in jobs:
        out, err = job.communicate(timeout=300)
        assert job.returncode == 0, err[-3000:]
        ids.append(out.strip())
    # then one job made it and they all use it
    cfg = compose(registry_overrides)
    runs.setup(cfg)
    parents, _ = sweep_runs(cfg, str(folder))
    assert len(set(ids)) == 1 and [p.info.run_id for p in parents] == ids[:1]
    assert json.loads((folder / sweep.PARENT_FILE).read_text())["run_id"] == ids[0]


WATCH = """
import sys
from detloop.core.config import compose
from detloop.tracking import oversight, runs
cfg = compose(sys.argv[1:])
runs.setup(cfg)
print("ready", flush=True)
sys.stdin.readline()  # all watchers look at the same moment
print(len(oversight.watch(cfg)), flush=True)
"""


def test_watchers_at_once_record_a_move_made_outside_detloop_once_and_put_it_back_once(server, registry_overrides):
    overrides = [*registry_overrides, f"mlflow.tracking_uri={server}", "promote.ui_moves.policy=enforce"]
    cfg = compose(overrides)
    runs.setup(cfg)
    v1, _ = gated_versions(cfg, 1)
    rejected = register_version(cfg, {"kind": "finetune", "decision": "reject", "gate.decision": "reject"})
    # given production moved to a rejected version through the API (as in the MLflow UI)
    registry.client().set_registered_model_alias(cfg.mlflow.registered_model, "production", rejected)
    # when three detloop processes (gate jobs, a serve poll) look at the registry at the same moment
    watchers = [start(WATCH, *overrides) for _ in range(3)]
    for watcher in watchers:
        resume(watcher)
    for watcher in watchers:
        out, err = watcher.communicate(timeout=300)
        assert watcher.returncode == 0, err[-3000:]
    # then the move is recorded once, put back once, and production is v1 again
    moves = [m for m in registry.history(cfg) if m["alias"] == "production"]
    print([(m["decision"], m["to_version"], m["state"]) for m in moves])
    assert [m["to_version"] for m in moves if m["external"]] == [rejected]
    assert [m["to_version"] for m in moves if m["decision"] == "revert" and m["state"] == "done"] == [v1]
    assert production_versions(cfg) == [v1] and "pending" not in {m["state"] for m in moves}
