"""A single-node SLURM for the team stack: munged, slurmctld and slurmd in the foreground, tracked by pid.

Everything lives in ``<state folder>/slurm``: the munge key and socket, ``slurm.conf`` (clients find it
through ``SLURM_CONF``), the controller's state and the node's spool. The Debian packages
(``slurmctld slurmd slurm-client munge``) are installed with apt-get when missing and asked for.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from detloop.core.env import free_port
from detloop.team import process
from detloop.team.process import Proc, StackFailed

log = logging.getLogger(__name__)

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
TOOLS = ("munged", "slurmctld", "slurmd", "sinfo", "srun", "sbatch")


class SlurmUnavailable(StackFailed):
    """SLURM is not installed and apt-get could not install it."""


def ensure_installed(log_path: Path) -> None:
    """Install the Debian SLURM packages with apt-get when a tool is missing (as root, else ``sudo -n``)."""
    if all(shutil.which(tool) for tool in TOOLS):
        return
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log.info("installing %s with apt-get (log: %s)", " ".join(PACKAGES), log_path)
    with open(log_path, "ab") as handle:
        for argv in (
            [*sudo, "apt-get", "update", "-qq"],
            [*sudo, "apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES],
        ):
            try:
                done = subprocess.run(argv, stdout=handle, stderr=subprocess.STDOUT, env=env, check=False).returncode
            except OSError as err:
                raise SlurmUnavailable(f"slurm: cannot run {argv[len(sudo)]}: {err}") from err
            if done != 0:
                raise SlurmUnavailable(f"slurm: `{' '.join(argv)}` failed ({done}); see {log_path}")
    missing = [tool for tool in TOOLS if not shutil.which(tool)]
    if missing:
        raise SlurmUnavailable(f"slurm: {', '.join(missing)} still missing after apt-get install; see {log_path}")


def node_line(name: str) -> str:
    """``NodeName=...`` with this machine's real CPUs and memory (``slurmd -C``), on the loopback address."""
    found = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=False).stdout.splitlines()
    line = next((x for x in found if x.startswith("NodeName=")), "")
    if not line:
        memory = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
        line = f"NodeName={name} CPUs={os.cpu_count() or 1} RealMemory={memory}"
    words = [w for w in line.split() if not w.startswith("NodeName=")]
    return " ".join([f"NodeName={name}", "NodeAddr=127.0.0.1", *words, "State=UNKNOWN"])


def write_conf(folder: Path, name: str, partition: str) -> Path:
    """A minimal slurm.conf for one node on 127.0.0.1, free ports, no cgroups, no accounting."""
    user = "root" if os.geteuid() == 0 else os.environ.get("USER") or str(os.geteuid())
    lines = [
        "# single-node SLURM of the detloop team stack (written by detloop team up)",
        "ClusterName=detloop",
        f"SlurmctldHost={name}(127.0.0.1)",
        f"SlurmctldPort={free_port()}",
        f"SlurmdPort={free_port()}",
        f"SlurmUser={user}",
        f"SlurmdUser={user}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={folder / 'munge' / 'munge.socket'}",
        f"StateSaveLocation={folder / 'ctld'}",
        f"SlurmdSpoolDir={folder / 'spool'}",
        f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
        f"SlurmdPidFile={folder / 'slurmd.pid'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "JobCompType=jobcomp/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "MpiDefault=none",
        "ReturnToService=2",
        node_line(name),
        f"PartitionName={partition} Nodes={name} Default=YES MaxTime=INFINITE State=UP",
    ]
    conf = folder / "slurm.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


def _wait(check: Callable[[], bool], popens: list, what: str, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for popen in popens:
            if popen.poll() is not None:
                raise StackFailed(f"{what}: a daemon exited with {popen.returncode}; see {log_path}")
        if check():
            return
        time.sleep(0.25)
    raise StackFailed(f"{what}: not ready within {timeout:.0f} s; see {log_path}")


def node_state(conf: Path) -> str:
    """The node's state as ``sinfo`` reports it ('' when the controller does not answer)."""
    done = subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, env={**os.environ, "SLURM_CONF": str(conf)}
    )
    return done.stdout.strip() if done.returncode == 0 else ""


def start(state_folder: Path, settings: dict, record: Callable[[Proc, subprocess.Popen], None]) -> Path:
    """munged, slurmctld and slurmd (each recorded through ``record`` as soon as it runs); the node idle on return.

    Returns the slurm.conf path (what clients need as ``SLURM_CONF``).
    """
    logs = state_folder / "logs"
    ensure_installed(logs / "slurm-apt.log")
    folder = state_folder / "slurm"
    if folder.exists():  # a previous stack's controller state: every up starts fresh
        shutil.rmtree(folder)
    for sub in ("munge", "ctld", "spool"):
        (folder / sub).mkdir(parents=True, mode=0o700)
    key = folder / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    name = socket.gethostname().split(".")[0]
    conf = write_conf(folder, name, settings["partition"])
    env = {**os.environ, "SLURM_CONF": str(conf)}
    timeout = float(settings["timeout"])
    munge = folder / "munge"
    daemons = [
        (
            "munged",
            ["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={munge / 'munge.socket'}"]
            + [
                f"--pid-file={munge / 'munged.pid'}",
                f"--log-file={logs / 'munged.log'}",
                f"--seed-file={munge / 'seed'}",
            ],
            lambda: (munge / "munge.socket").exists(),
        ),
        ("slurmctld", ["slurmctld", "-D", "-i", "-f", str(conf)], lambda: node_state(conf) != ""),
        ("slurmd", ["slurmd", "-D", "-f", str(conf), "-N", name], lambda: node_state(conf) == "idle"),
    ]
    popens = []
    for daemon, argv, ready in daemons:
        t0 = time.monotonic()
        popen, proc = process.spawn(daemon, argv, logs / f"{daemon}.log", env=env)
        record(proc, popen)
        popens.append(popen)
        _wait(ready, popens, daemon, logs / f"{daemon}.log", timeout)
        proc.extra["startup_s"] = round(time.monotonic() - t0, 1)
    return conf


def stop_jobs(conf: Path, timeout: float = 20.0) -> None:
    """Cancel every job of this cluster and wait for the queue to empty (before the daemons stop)."""
    env = {**os.environ, "SLURM_CONF": str(conf)}
    user = "root" if os.geteuid() == 0 else os.environ.get("USER") or str(os.geteuid())
    subprocess.run(["scancel", "--quiet", "--full", f"--user={user}"], env=env, capture_output=True, check=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue = subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True, check=False)
        if queue.returncode != 0 or not queue.stdout.strip():
            return
        time.sleep(0.5)
    log.warning("slurm: jobs still queued after %.0f s; their processes are stopped with the cluster", timeout)


def leftover_pids(conf: Path) -> list[int]:
    """Processes of this cluster's jobs (slurmstepd and everything under it) that outlived the daemons.

    slurmd starts each job step in a session of its own, so stopping slurmd's process group does not
    reach them. They are found as the ``slurmstepd`` processes with this cluster's ``SLURM_CONF`` in their
    environment, and their descendants (never a shell that merely sourced env.sh).
    """
    marker = f"SLURM_CONF={conf}".encode()
    parents: dict[int, int] = {}
    roots = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            stat = (entry / "stat").read_text()
            parents[pid] = int(stat.rsplit(")", 1)[1].split()[1])
            if (entry / "comm").read_text().strip().startswith("slurmstepd") and marker in (
                entry / "environ"
            ).read_bytes().split(b"\0"):
                roots.append(pid)
        except (OSError, ValueError, IndexError):
            continue
    found = set(roots)
    grew = True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in found and pid not in found:
                found.add(pid)
                grew = True
    found.discard(os.getpid())
    return sorted(found)


def kill_leftovers(conf: Path, timeout: float = 10.0) -> list[int]:
    """SIGKILL what :func:`leftover_pids` finds (after the daemons stopped); returns the pids."""
    import signal

    pids = leftover_pids(conf)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
        time.sleep(0.1)
    return pids
