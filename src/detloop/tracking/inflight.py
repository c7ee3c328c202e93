"""Alias moves in flight: whose process opened an audit run, whether it still lives, and who goes ahead.

Every detloop alias move opens an audit run (RUNNING) before it touches the alias
(:func:`detloop.tracking.registry.move_alias`). Two people (or two jobs) moving the same alias at
once therefore see each other's RUNNING audit runs, and this module decides which one goes ahead:

* each move tags its audit run with its process (:data:`OWNER_TAG`, ``host:pid:start``), so a RUNNING
  run is known to be live (the process still runs on this host) or dead (it was killed: settle it).
  A run from another host counts as live while younger than the lease (``promote.ui_moves.settle_seconds``),
  one of a live process that gave the move up (the server went away) or that is stuck for
  :data:`MAX_MOVE_SECONDS` counts as dead;
* after opening its run, a move lists the other RUNNING moves of the alias it sees and tags that list
  on its own run (:data:`SEEN_TAG`), then looks at each rival's list: it goes ahead only if every live
  rival saw it too and it is the earlier of the two (start time, then run id). Two moves that both
  go ahead would each have to be earlier than the other, or neither saw the other, which the store's
  order of writes rules out; a rival that never says what it saw within :data:`WAIT_SECONDS` wins.

The holder is then read again by the caller: a move that finished in between is caught there.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass

OWNER_TAG = "audit.process"  # host:pid:start time of the process making the move
SEEN_TAG = "audit.seen"  # JSON list: the other moves of the alias this one saw in flight
WAIT_SECONDS = 10.0  # how long a move waits for a live rival to say which moves it saw
MAX_MOVE_SECONDS = 600.0  # a move open longer than this is stuck, even if its process still runs
_abandoned: set[str] = set()  # audit runs of this process's moves that failed midway (the server went away)


def abandon(run_id: str) -> None:
    """This process gave up the move of audit run ``run_id`` (it failed midway): it is no longer in flight."""
    _abandoned.add(run_id)


def process_identity() -> str:
    """``host:pid:start`` of this process (the start time tells a reused pid apart)."""
    import psutil

    me = psutil.Process()
    return f"{socket.gethostname()}:{me.pid}:{me.create_time():.3f}"


def _same_host_process_alive(pid: int, started: float) -> bool:
    import psutil

    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - started) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # exists but not ours to inspect: assume it lives
        return True


def owner_alive(run, lease_seconds: float) -> bool:
    """Whether the process that opened the RUNNING audit run ``run`` may still be moving the alias.

    On this host: its process still runs (and has not given the move up, see :func:`abandon`), for at most
    :data:`MAX_MOVE_SECONDS`. Elsewhere (or an untagged run): opened less than ``lease_seconds`` ago.
    """
    if run.info.run_id in _abandoned:
        return False
    age = time.time() - run.info.start_time / 1000
    host, _, rest = run.data.tags.get(OWNER_TAG, "").partition(":")
    pid, _, started = rest.partition(":")
    if host == socket.gethostname() and pid.isdigit():
        try:
            return age < MAX_MOVE_SECONDS and _same_host_process_alive(int(pid), float(started))
        except ValueError:
            pass
    return age < lease_seconds


def _key(run) -> tuple[int, str]:
    return run.info.start_time, run.info.run_id


@dataclass(frozen=True)
class Rival:
    """A live move of the same alias that goes ahead of this one."""

    run_id: str
    who: str
    from_version: str
    to_version: str
    time: str

    def describe(self) -> str:
        target = f"v{self.to_version}" if self.to_version else "-"
        return (
            f"{self.who} is moving it (v{self.from_version or '-'} -> {target}, audit run {self.run_id}, "
            f"opened {self.time})"
        )


def _rival(run) -> Rival:
    tags = run.data.tags
    return Rival(
        run.info.run_id,
        tags.get("audit.who", "?"),
        tags.get("audit.from_version", ""),
        tags.get("audit.to_version", ""),
        tags.get("audit.time", ""),
    )


def first_rival(client, mine_id: str, running: list, lease_seconds: float) -> Rival | None:
    """Tag what this move saw, then return the live rival that goes ahead of it (None: this move may go).

    ``running`` are the RUNNING audit runs of the alias (this move's included or not).
    """
    rivals = [r for r in running if r.info.run_id != mine_id]
    client.set_tag(mine_id, SEEN_TAG, json.dumps(sorted(r.info.run_id for r in rivals)))
    mine = client.get_run(mine_id)
    for rival in rivals:
        if _goes_ahead(client, mine, rival, lease_seconds):
            return _rival(rival)
    return None


def _goes_ahead(client, mine, rival, lease_seconds: float) -> bool:
    """True when ``rival`` may move the alias, so ``mine`` must not."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        if rival.info.status != "RUNNING":
            return False  # settled: a finished move shows in the holder, a refused or interrupted one moved nothing
        if not owner_alive(rival, lease_seconds):
            return False  # its process died: the holder shows whether it moved
        seen = rival.data.tags.get(SEEN_TAG)
        if seen is not None:
            return not (mine.info.run_id in json.loads(seen) and _key(mine) < _key(rival))
        if time.monotonic() > deadline:
            return True  # live but silent: it may be moving
        time.sleep(0.1)
        rival = client.get_run(rival.info.run_id)
