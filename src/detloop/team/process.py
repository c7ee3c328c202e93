"""The processes of the team stack: each started in its own session, recorded by pid, stopped by process group.

A recorded process is signalled only while it is still the same process: its pid *and* its start time
(``/proc/PID/stat``, clock ticks since boot) must match, so a ``down`` long after an ``up`` never
signals a process that reused the pid. Zombies count as stopped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

TERM_TIMEOUT = 20.0  # seconds between SIGTERM and SIGKILL


class StackFailed(RuntimeError):
    """A service of the team stack did not start (or stop); the message names the service and its log."""

    exit_code = 1


@dataclass
class Proc:
    """One recorded process: a service's main process and the process group it leads."""

    name: str
    pid: int
    pgid: int
    started: int  # start time in clock ticks since boot (/proc/PID/stat field 22)
    log: str
    port: int | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Proc:
        return cls(**data)


def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, pgid, start ticks) of ``pid``, or None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = text.rpartition(")")[2].split()
    return fields[0], int(fields[1]), int(fields[2]), int(fields[19])


def _table() -> dict[int, tuple[str, int, int, int]]:
    """Every live (non-zombie) process: pid -> (state, ppid, pgid, start ticks)."""
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            found = _stat(int(entry.name))
            if found is not None and found[0] not in ("Z", "X"):
                table[int(entry.name)] = found
    return table


def process_of(name: str, pid: int, log_path: Path | str, port: int | None = None, **extra) -> Proc:
    """The record of the running process ``pid`` (raises StackFailed if it is not running)."""
    found = _stat(pid)
    if found is None:
        raise StackFailed(f"{name}: process {pid} is not running; see {log_path}")
    return Proc(name, pid, found[2], found[3], str(log_path), port, dict(extra))


def is_running(proc: Proc) -> bool:
    """True while ``proc``'s pid is still the process that was recorded and is not a zombie."""
    found = _stat(proc.pid)
    return found is not None and found[0] not in ("Z", "X") and found[3] == proc.started


def members(proc: Proc) -> tuple[dict[int, int], bool]:
    """The live processes of ``proc`` (pid -> start ticks): its process group and all its descendants.

    Also says whether the process group is still ``proc``'s: while its leader is ``proc``, or after the
    leader ended (Linux does not reuse a pid that still names a process group). Descendants that left
    the group (PostgreSQL's backends call setsid) are found through their parent links.
    """
    table = _table()
    leader = table.get(proc.pgid)
    own_group = (leader is None or leader[3] == proc.started) if proc.pgid == proc.pid else is_running(proc)
    found = {pid: row[3] for pid, row in table.items() if own_group and row[2] == proc.pgid}
    if is_running(proc):
        found[proc.pid] = proc.started
    children: dict[int, list[int]] = {}
    for pid, row in table.items():
        children.setdefault(row[1], []).append(pid)
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found[child] = table[child][3]
                todo.append(child)
    return found, own_group and any(table[p][2] == proc.pgid for p in found if p in table)


def _alive(pids: dict[int, int]) -> dict[int, int]:
    out = {}
    for pid, started in pids.items():
        found = _stat(pid)
        if found is not None and found[0] not in ("Z", "X") and found[3] == started:
            out[pid] = started
    return out


def _signal(pids: dict[int, int], pgid: int | None, sig: int) -> None:
    """``sig`` to the process group ``pgid`` (if given) and to each of ``pids``."""
    if pgid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
    for pid in _alive(pids):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def wait_gone(pids: dict[int, int], timeout: float) -> dict[int, int]:
    """Wait up to ``timeout`` s for ``pids`` (pid -> start ticks) to end; return those still running."""
    deadline = time.monotonic() + timeout
    left = _alive(pids)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = _alive(left)
    return left


def stop(proc: Proc, timeout: float = TERM_TIMEOUT, popen: subprocess.Popen | None = None) -> bool:
    """SIGTERM ``proc``'s process group and descendants, SIGKILL what is left after ``timeout`` s.

    Returns True if anything was running. ``popen`` (when this process started it) is reaped.
    """
    targets, own_group = members(proc)
    group = proc.pgid if own_group else None
    if targets:
        _signal(targets, group, signal.SIGTERM)
        left = wait_gone(targets, timeout)
        if left:
            log.warning("%s did not stop within %.0f s after SIGTERM: SIGKILL to %s", proc.name, timeout, sorted(left))
            _signal(left, group, signal.SIGKILL)
            left = wait_gone(left, 10.0)
        if left:
            raise StackFailed(f"{proc.name}: processes {sorted(left)} survive SIGKILL; see {proc.log}")
    if popen is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=5)
    return bool(targets)


def spawn(
    name: str,
    argv: list[str],
    log_path: Path,
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    port: int | None = None,
    **extra,
) -> tuple[subprocess.Popen, Proc]:
    """Start ``argv`` in a session of its own with stdout and stderr appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as handle:
        try:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        except OSError as err:
            raise StackFailed(f"{name}: cannot start {argv[0]}: {err}") from err
    found = _stat(popen.pid)
    started = found[3] if found else 0
    return popen, Proc(name, popen.pid, popen.pid, started, str(log_path), port, dict(extra))


def log_tail(path: Path | str, chars: int = 2000) -> str:
    """The end of a log file ('' if there is none), for error messages."""
    try:
        return Path(path).read_text(errors="replace")[-chars:].strip()
    except OSError:
        return ""


def wait_healthy(
    url: str,
    popen: subprocess.Popen | None,
    what: str,
    timeout: float = 120.0,
    log: Path | None = None,
    path: str = "/health",
) -> float:
    """Wait until ``url`` + ``path`` answers 200; return the seconds waited.

    Raises StackFailed naming ``what`` (and the end of its ``log``) when the process exits first or
    the URL does not answer within ``timeout`` s. Stopping the process is the caller's business.
    """
    import requests

    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if popen is not None and popen.poll() is not None:
            raise StackFailed(
                f"{what} exited with {popen.returncode} before answering {url}{path}; see {log}:\n{log_tail(log or '')}"
            )
        try:
            if requests.get(f"{url}{path}", timeout=2).ok:
                return time.monotonic() - start
        except requests.RequestException:
            pass
        time.sleep(0.25)
    raise StackFailed(f"{what} did not answer {url}{path} within {timeout:.0f} s; see {log}")
