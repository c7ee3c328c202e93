"""Many writers on one registry: a move that loses a race is refused, named and recorded (real SQLite store).

The other mover is an audit run opened the way a second detloop process opens it (its process tag and the
list of moves it saw), so the rules run without a second process; tests/integration/test_shared_server.py
races real processes against a real server.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import psutil
import pytest
from tests.unit.test_promote import bootstrap, gated, holders, tags_of

from detloop.cli.main import main
from detloop.core.errors import MoveConflict
from detloop.tracking import inflight, registry
from detloop.tracking.promotion import promote_version


def rival_move(cfg, frm: str, to: str, *, who: str = "alice", seen: str | None = "[]", owner: str | None = None) -> str:
    """Given another detloop move of production in flight: its audit run, opened by ``owner`` (default: alive)."""
    tags = {inflight.OWNER_TAG: owner or inflight.process_identity()}
    if seen is not None:
        tags[inflight.SEEN_TAG] = seen
    return registry.record_move(
        cfg, "production", frm, to, why="rival", who=who, decision="promote", figures=None, tags=tags
    )


def dead_process() -> str:
    """The process tag of a process of this host that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    started = psutil.Process(proc.pid).create_time()
    proc.kill()
    proc.wait()
    return f"{socket.gethostname()}:{proc.pid}:{started:.3f}"


def test_a_move_while_another_is_in_flight_is_refused_naming_the_mover_and_recorded(registry_cfg):
    cfg = registry_cfg
    v1 = bootstrap(cfg)
    v2, v3 = gated(cfg, "pass"), gated(cfg, "pass")
    # given alice's move v1 -> v2 in flight (her audit run is open, her process lives)
    rival = rival_move(cfg, v1, v2, who="alice")
    # when bob promotes v3
    with pytest.raises(MoveConflict, match=rf"alice is moving it \(v{v1} -> v{v2}, audit run {rival}"):
        promote_version(cfg, v3, reviewer="bob", reason="my call")
    # then nothing moved, nothing was tagged, and bob's attempt is in the trail as refused, naming alice
    assert holders(cfg)["production"] == v1
    assert "promoted_by" not in tags_of(cfg, v3)
    *_, theirs, mine = registry.history(cfg)
    assert (mine["who"], mine["to_version"], mine["state"]) == ("bob", v3, "refused")
    assert "alice is moving it" in mine["refusal"]
    # and alice's live move was not settled as interrupted by bob's reconcile
    assert theirs["state"] == "pending"


def test_a_move_based_on_a_holder_that_changed_is_refused_naming_the_new_holder(
    registry_cfg, registry_overrides, capsys
):
    cfg = registry_cfg
    v1 = bootstrap(cfg)
    v2, v3 = gated(cfg, "pass"), gated(cfg, "pass")
    # given bob read production (v1), then alice moved it to v2
    registry.move_alias(cfg, "production", v2, why="alice's call", who="alice", decision="promote")
    # when bob's move, decided against v1, goes ahead
    with pytest.raises(MoveConflict, match=rf"changed since this command read it \(v{v1}\): v{v2} holds it now"):
        registry.move_alias(
            cfg, "production", v3, why="bob's call", who="bob", expected=v1, version_tags={"promoted_by": "bob"}
        )
    # then v2 keeps it, v3 is untouched, and the history shows bob's attempt as refused, naming alice
    assert holders(cfg)["production"] == v2 and "promoted_by" not in tags_of(cfg, v3)
    assert main(["registry", "--history", *registry_overrides]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert f"v{v2} -> v{v3}  by bob" in last and "[refused]" in last
    assert f"v{v2} holds it now (given by alice" in last


def test_of_two_moves_that_saw_each_other_the_earlier_goes_ahead(registry_cfg):
    cfg = registry_cfg
    v1 = bootstrap(cfg)
    v2, v3 = gated(cfg, "pass"), gated(cfg, "pass")
    first = rival_move(cfg, v1, v2, who="alice", seen=None)
    time.sleep(0.01)
    second = rival_move(cfg, v1, v3, who="bob", seen=None)
    c, running = registry.client(), registry._running(cfg, "production")
    assert {r.info.run_id for r in running} == {first, second}
    # when each says what it saw (each saw the other): the later yields to the earlier, the earlier goes ahead
    assert inflight.first_rival(c, second, running, 30.0).run_id == first
    assert inflight.first_rival(c, first, registry._running(cfg, "production"), 30.0) is None


def test_a_dead_movers_record_is_settled_and_never_blocks_a_move(registry_cfg):
    cfg = registry_cfg
    v1 = bootstrap(cfg)
    v2, v3 = gated(cfg, "pass"), gated(cfg, "pass")
    # given a move killed after opening its audit run (its process is gone), saying it saw nobody
    rival_move(cfg, v1, v2, who="killed", owner=dead_process())
    # when someone promotes: the dead move is settled as interrupted and the promotion goes ahead
    assert promote_version(cfg, v3, reviewer="bob", reason="after the crash")["moved"]
    assert holders(cfg)["production"] == v3
    states = [(m["who"], m["state"]) for m in registry.history(cfg) if m["alias"] == "production"]
    assert states[-2:] == [("killed", "interrupted"), ("bob", "done")]


def test_a_live_move_is_in_flight_and_another_hosts_move_counts_as_live_for_the_lease():
    def run(owner: str, age: float):
        tags = {inflight.OWNER_TAG: owner} if owner else {}
        info = SimpleNamespace(start_time=int((time.time() - age) * 1000), run_id="r")
        return SimpleNamespace(data=SimpleNamespace(tags=tags), info=info)

    assert inflight.owner_alive(run(inflight.process_identity(), age=300), 30)  # this process: alive past the lease
    assert not inflight.owner_alive(run(inflight.process_identity(), age=inflight.MAX_MOVE_SECONDS + 1), 30)  # stuck
    assert not inflight.owner_alive(run(dead_process(), age=1), 30)  # a dead process of this host: at once
    assert inflight.owner_alive(run("elsewhere.example:42:1.0", age=5), 30)  # another host: the lease
    assert not inflight.owner_alive(run("elsewhere.example:42:1.0", age=31), 30)
    assert not inflight.owner_alive(run("", age=31), 30) and inflight.owner_alive(run("", age=5), 30)


def test_cli_promote_refused_by_a_concurrent_move_exits_2_naming_the_mover(registry_cfg, registry_overrides, capsys):
    cfg = registry_cfg
    v1 = bootstrap(cfg)
    v2, v3 = gated(cfg, "pass"), gated(cfg, "pass")
    rival_move(cfg, v1, v2, who="alice")
    assert main(["promote", v3, "--reviewer", "bob", "--reason", "mine", *registry_overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: production of ") and "alice is moving it" in err and "nothing changed" in err
    assert "Traceback" not in err and holders(cfg)["production"] == v1


def test_a_move_this_process_gave_up_does_not_block_its_next_move(registry_cfg):
    cfg = registry_cfg
    v1 = bootstrap(cfg)
    v2, v3 = gated(cfg, "pass"), gated(cfg, "pass")
    # given a move of this (long-running) process that failed midway, e.g. the server went away
    given_up = rival_move(cfg, v1, v2, who="serve", seen=None)
    inflight.abandon(given_up)
    # when it moves again: its own dead attempt is settled, not waited for
    started = time.monotonic()
    assert promote_version(cfg, v3, reviewer="bob", reason="server is back")["moved"]
    assert time.monotonic() - started < inflight.WAIT_SECONDS
    states = [(m["who"], m["state"]) for m in registry.history(cfg) if m["alias"] == "production"]
    assert states[-2:] == [("serve", "interrupted"), ("bob", "done")]


def test_a_sweep_job_that_finds_base_taken_does_not_take_production(registry_cfg, tmp_path):
    """Two base jobs of a sweep into an empty registry: job A has taken ``base`` and is about to take
    ``production``; job B, finishing in between, finds ``base`` taken and must take neither alias (before,
    it took ``production``, leaving base and production on different versions)."""
    import mlflow
    from tests.conftest import register_version

    from detloop import base as base_stage
    from detloop.tracking import runs

    name = registry_cfg.mlflow.registered_model
    first, second = register_version(registry_cfg), register_version(registry_cfg)
    run_b = mlflow.MlflowClient().get_model_version(name, second).run_id
    mlflow.MlflowClient().set_tag(run_b, runs.SWEEP_TAG, str(tmp_path / "sweep"))
    assert base_stage._take_if_free(registry_cfg, "base", first, why="job A", decision="base")

    base_stage._tag_and_alias(registry_cfg, second, run_b, tmp_path / "anchor")

    assert registry.alias_holder(name, "base") == first
    assert registry.alias_holder(name, "production") is None  # left to job A, which took base
