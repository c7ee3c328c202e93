"""The registry under faults: promotions killed at random moments, concurrent registrations, a real server.

Workers are separate ``python -c`` processes (imports take a few seconds each, so they announce
``ready`` once their loop runs, and the clock for a kill starts then). SQLite runs on the shared test
store; the server is a real ``mlflow server`` on 127.0.0.1 (``tests/integration/conftest.py``).
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time

import pytest
from tests.conftest import register_version

from detloop.core.config import compose
from detloop.core.stage import stage_dir, write_json
from detloop.promote import run as run_promote
from detloop.tracking import registry, runs, store
from detloop.tracking.promotion import promote_version, rollback

pytestmark = pytest.mark.integration

PROMOTE_LOOP = """
import itertools, sys
from detloop.core.config import compose
from detloop.core.errors import MoveConflict
from detloop.tracking.promotion import promote_version
from detloop.tracking.runs import setup
cfg = compose(sys.argv[2:])
setup(cfg)
versions = sys.argv[1].split(",")
for i in itertools.count():
    try:
        promote_version(cfg, versions[i % len(versions)], reviewer="worker", reason=f"loop {i}")
    except MoveConflict:  # the other loop's move won this race (recorded as refused): go on
        pass
    if i == 1:  # warm: the kill clock starts inside the loop
        print("ready", flush=True)
"""

REGISTER = """
import sys
import detloop  # telemetry off before MLflow starts
import mlflow
from mlflow.entities import LoggedModelStatus
count, name, uris = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
print("ready", flush=True)
sys.stdin.readline()  # all workers start together
for uri in uris:
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("detloop").experiment_id
    got = []
    for _ in range(count):
        run = client.create_run(experiment)
        model = client.create_logged_model(experiment, name="model", source_run_id=run.info.run_id)
        client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        # what mlflow.pyfunc.log_model(registered_model_name=...) calls in detloop.model.pyfunc.log_detector
        got.append(mlflow.register_model(f"models:/{model.model_id}", name).version)
    print(" ".join(map(str, got)), flush=True)
"""


def start(code: str, *args: str) -> subprocess.Popen:
    """A worker process, returned once it printed ``ready``."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise AssertionError(f"worker did not start: {line!r} {proc.stderr.read()[-2000:]}")
    return proc


def production_versions(cfg) -> list[str]:
    """Every version whose aliases include production (read when nothing moves)."""
    c, name = registry.client(), cfg.mlflow.registered_model
    found = c.search_model_versions(f"name='{name}'")
    return [str(v.version) for v in found if "production" in c.get_model_version(name, v.version).aliases]


def holder_snapshot(cfg) -> str | None:
    """The production holder from one read of the registered model (an atomic snapshot)."""
    holder = registry.client().get_registered_model(cfg.mlflow.registered_model).aliases.get("production")
    return None if holder is None else str(holder)


def gated_versions(cfg, count: int) -> list[str]:
    """Given a bootstrapped production v1 and ``count`` more versions that passed the gate."""
    first = register_version(cfg, {"kind": "base", "decision": "bootstrap"})
    registry.move_alias(cfg, "production", first, why="bootstrap", decision="bootstrap")
    tags = {"kind": "finetune", "decision": "pass", "gate.decision": "pass", "gate.regression.drop": "0.1000"}
    return [first, *(register_version(cfg, tags) for _ in range(count))]


# --------------------------------------------------------------------------- (a) SIGKILL during promotions


def test_promotions_killed_at_random_moments_leave_exactly_one_production_holder(registry_cfg, registry_overrides):
    cfg = registry_cfg
    versions = gated_versions(cfg, 3)
    loop = versions[1:]  # the gated ones
    registry.audit_experiment_id(cfg)
    rng = random.Random()  # the delays are printed on failure
    # when two concurrent promotion loops are killed at random moments, while we watch the alias
    workers = [start(PROMOTE_LOOP, ",".join(order), *registry_overrides) for order in (loop, loop[::-1])]
    delays = [rng.uniform(0.3, 2.0) for _ in workers]
    print(f"kill delays {delays}")
    deadlines = [time.time() + delay for delay in delays]
    give_up = time.time() + 120  # a loaded machine may need longer than the delay to move the alias at all
    seen = []
    while any(w.poll() is None for w in workers):
        seen.append(holder_snapshot(cfg))
        moved = len(set(seen)) > 1  # kill only while moves are under way (after the watcher saw one)
        for worker, deadline in zip(workers, deadlines, strict=True):
            if worker.poll() is None and time.time() >= deadline and (moved or time.time() >= give_up):
                worker.kill()
                worker.wait()
    assert [w.returncode for w in workers] == [-signal.SIGKILL] * 2, [w.stderr.read()[-2000:] for w in workers]
    # then production always pointed at exactly one registered version, and still does
    assert set(seen) <= set(versions) and None not in seen and len(set(seen)) > 1
    assert len(production_versions(cfg)) == 1
    # when a single loop is killed, the audit trail settles to agree with the registry
    worker = start(PROMOTE_LOOP, ",".join(loop), *registry_overrides)
    time.sleep(rng.uniform(0.2, 1.5))
    worker.kill()
    assert worker.wait() == -signal.SIGKILL
    assert production_versions(cfg) == [holder_snapshot(cfg)]
    registry.reconcile(cfg, "production")
    done = [m for m in registry.history(cfg) if m["alias"] == "production" and m["state"] == "done"]
    assert done[-1]["to_version"] == holder_snapshot(cfg) and len(done) >= 4  # the loops did promote
    assert "pending" not in {m["state"] for m in registry.history(cfg)}
    # and a rollback after all this walks back to the version recorded before the holder
    holder = holder_snapshot(cfg)
    result = rollback(cfg, reviewer="ops", reason="after the crash test")
    assert result["from"] == holder and production_versions(cfg) == [result["to"]]


# --------------------------------------------------------------------------- (b) concurrent registrations


def register_concurrently(uris: list[str], name: str, processes: int = 4, count: int = 5) -> list[list[list[int]]]:
    """``processes`` workers register ``count`` versions each in every store, all starting together.

    Returns, per store, the version numbers each worker got.
    """
    workers = [start(REGISTER, str(count), name, *uris) for _ in range(processes)]
    for worker in workers:
        worker.stdin.write("go\n")
        worker.stdin.flush()
    per_store: list[list[list[int]]] = [[] for _ in uris]
    for worker in workers:
        out, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err[-3000:]
        for got, line in zip(per_store, out.splitlines(), strict=True):
            got.append([int(v) for v in line.split()])
    return per_store


def test_concurrent_registrations_lose_no_version_on_sqlite_and_on_a_server(server, registry_overrides):
    sqlite_cfg = compose(registry_overrides)
    server_cfg = compose([*registry_overrides, f"mlflow.tracking_uri={server}"])
    for cfg in (sqlite_cfg, server_cfg):
        runs.setup(cfg)  # the experiment exists before the race
    name = sqlite_cfg.mlflow.registered_model
    # when 4 processes register 5 versions each, at the same time, in each store
    results = register_concurrently([store.tracking_uri(sqlite_cfg), server], name)
    # then every store holds versions 1..20, each given to exactly one registration
    for cfg, got in zip((sqlite_cfg, server_cfg), results, strict=True):
        runs.setup(cfg)
        assert sorted(v for worker in got for v in worker) == list(range(1, 21))
        assert len(registry.client().search_model_versions(f"name='{name}'", max_results=1000)) == 20


SETUP = """
import sys
from detloop.core.config import compose
from detloop.tracking.runs import setup
cfg = compose(sys.argv[1:])
print("ready", flush=True)
sys.stdin.readline()  # all workers start together
print(setup(cfg), flush=True)
"""


def test_concurrent_first_use_of_a_new_sqlite_store_creates_it_once(tmp_path, registry_overrides):
    store = tmp_path / "fresh-store"
    overrides = [*(o for o in registry_overrides if not o.startswith("mlflow.store_dir=")), f"mlflow.store_dir={store}"]
    # when 4 processes (e.g. parallel sweep jobs) set up a store that does not exist yet, at the same time
    workers = [start(SETUP, *overrides) for _ in range(4)]
    for worker in workers:
        worker.stdin.write("go\n")
        worker.stdin.flush()
    ids = []
    for worker in workers:
        out, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err[-3000:]
        ids.append(out.strip())
    # then every one succeeds and they all got the one experiment
    assert len(set(ids)) == 1 and ids[0]
    cfg = compose(overrides)
    runs.setup(cfg)
    assert [e.name for e in registry.client().search_experiments()].count(cfg.mlflow.experiment) == 1
    # and the artifacts of the project's own store go under <store>/artifacts (also for the audit runs)
    for experiment_id in (ids[0], registry.audit_experiment_id(cfg)):
        assert registry.client().get_experiment(experiment_id).artifact_location == (store / "artifacts").as_uri()


# --------------------------------------------------------------------------- (c) promotion and rollback on a server


def test_promote_stage_promotion_and_rollback_through_a_server(server, registry_overrides):
    cfg = compose([*registry_overrides, f"mlflow.tracking_uri={server}"])
    runs.setup(cfg)
    v1, v2, v3 = gated_versions(cfg, 2)
    name = cfg.mlflow.registered_model
    # the stage promotes a passing fine-tune
    write_json(
        stage_dir(cfg, "gate") / "decision.json",
        {
            "skipped": False,
            "decision": "pass",
            "summary": "pass",
            "candidate": {"name": name, "version": v2, "kind": "finetune", "run_id": ""},
            "production": {"version": v1, "alias": "production"},
            "figures": {"gate.regression.drop": 0.1},
        },
    )
    assert run_promote(cfg)["finetune"]["to"] == v2
    # a human promotes the next one, then rolls back twice
    assert promote_version(cfg, v3, reviewer="a.chen", reason="reviewed")["from"] == v2
    assert rollback(cfg, reviewer="ops", reason="alerts")["to"] == v2
    assert rollback(cfg, reviewer="ops", reason="alerts again")["to"] == v1
    assert production_versions(cfg) == [v1]
    trail = [(m["from_version"], m["to_version"], m["decision"], m["who"]) for m in registry.history(cfg)]
    assert trail[1:] == [
        (v1, v2, "pass", trail[1][3]),
        (v2, v3, "promote", "a.chen"),
        (v3, v2, "rollback", "ops"),
        (v2, v1, "rollback", "ops"),
    ]
    assert registry.versions(cfg)[0]["tags"]["rolled_back"] == "true"
