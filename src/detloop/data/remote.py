"""Copies of ``data/`` on the DVC remote, so the verified pool does not live on one disk.

A command that changes the pool (``detloop review accept|reject|commit``) records the new data version
(``dvc add data``: :func:`detloop.data.store.record_data_version`) and then pushes it with
``dvc push -r REMOTE data.dvc`` to DVC's default remote, as ``pool.push.mode`` says (auto | always |
off). The remote and its credentials are DVC's own config (``dvc remote add -d``, ``dvc remote modify
--local``, ``AWS_*`` variables); detloop reads only the remote's name and URL, never its credentials.

The local change is complete before the push starts and is never rolled back. The data version is
recorded as owed in ``<pool.push.state_dir>/push-pending.json`` before the push starts, and removed
when the push delivered it. A failed push (remote unreachable, no credentials, refused, timed out) is
logged as a WARNING naming the remote and the reason, and the command exits with
:data:`PUSH_FAILED_EXIT`. Every later command that changes data, ``detloop pool status`` and
``detloop pool push`` retry first. Versions that were owed and have since been superseded are pushed
from the local DVC cache after the current one, so each version a command recorded reaches the remote.

``detloop inbox add`` (and failure reports from production) records a data version but does not push:
reports arrive at production's pace, are unverified and are never trained on; every push carries the
whole current version (anchor, pool and inbox), so the next review's push delivers them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from omegaconf import DictConfig, OmegaConf

from detloop.core.env import in_project, project_root
from detloop.core.errors import BadInput
from detloop.data.store import DvcData, dvc_data, fsync_dir, locked, utc_now

log = logging.getLogger(__name__)

MODES = ("auto", "always", "off")
PUSH_FAILED_EXIT = 4  # the change is complete and kept locally; its copy on the DVC remote is owed
PENDING_FILE = "push-pending.json"
LAST_PUSH_FILE = "last-push.json"
STOP_GRACE = 10.0  # seconds a stopped dvc push gets between SIGTERM and SIGKILL


@dataclass(frozen=True)
class Remote:
    """DVC's default remote: its name and URL (credentials stay in DVC's config)."""

    name: str
    url: str

    def __str__(self) -> str:
        return f"'{self.name}' ({self.url})"


@dataclass(frozen=True)
class PushSettings:
    """``pool.push``, checked."""

    mode: str
    timeout: float | None
    jobs: int | None
    state_dir: Path


@dataclass(frozen=True)
class PushPlan:
    """What a push would do: the settings, the DVC-tracked data (None: not tracked) and the remote (None: none)."""

    settings: PushSettings
    target: DvcData | None
    remote: Remote | None

    @property
    def possible(self) -> bool:
        return self.target is not None and self.remote is not None


@dataclass
class PushResult:
    """One push: the version (``<md5>.dir``) it was for, and what happened."""

    command: str
    remote: dict
    version: str | None
    ok: bool
    uploaded: int = 0  # objects DVC uploaded (0: the remote had them all)
    error: str = ""
    seconds: float = 0.0
    older: list[str] = field(default_factory=list)  # superseded owed versions pushed from the local cache
    lost: list[str] = field(default_factory=list)  # owed versions no longer in the local cache: dropped, warned
    still_owed: list[str] = field(default_factory=list)  # versions left in the marker
    attempted: bool = True  # False: not tried, the retry just before failed

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line for the terminal."""
        where = f"DVC remote '{self.remote['name']}' ({self.remote['url']})"
        if not self.ok:
            return f"NOT pushed: data version {self.version} to {where}: {self.error}"
        what = f"{self.uploaded} new object(s) uploaded" if self.uploaded else "the remote already had every object"
        older = f"; {len(self.older)} earlier owed version(s) pushed from the cache" if self.older else ""
        lost = f"; {len(self.lost)} earlier owed version(s) no longer in the cache, dropped" if self.lost else ""
        return f"pushed data version {self.version} to {where}: {what} in {self.seconds:.1f} s{older}{lost}"


# --------------------------------------------------------------------------- configuration


def push_settings(cfg: DictConfig) -> PushSettings:
    """``pool.push`` checked; BadInput names every bad key."""
    node = OmegaConf.select(cfg, "pool.push")
    if node is None:
        raise BadInput("pool.push is missing from the config (conf/pool/default.yaml)")
    mode, timeout, jobs, state_dir = (node.get(k) for k in ("mode", "timeout", "jobs", "state_dir"))
    problems = []
    if mode not in MODES:
        problems.append(f"pool.push.mode={mode!r}: one of {', '.join(MODES)}")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0):
        problems.append(f"pool.push.timeout={timeout!r}: seconds > 0, or null for no limit")
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        problems.append(f"pool.push.jobs={jobs!r}: a whole number >= 1, or null for DVC's default")
    if not state_dir:
        problems.append("pool.push.state_dir: must name a folder (relative to the project root)")
    if problems:
        raise BadInput("bad push configuration (conf/pool/default.yaml)", problems)
    return PushSettings(str(mode), None if timeout is None else float(timeout), jobs, in_project(state_dir))


def default_remote(root: Path) -> Remote | None:
    """DVC's default remote of the repository at ``root`` (``dvc remote default``), or None.

    Reads DVC's merged config (system, global, repository, ``--local``). BadInput when DVC cannot read
    it or when the default names a remote that is not defined.
    """
    from dvc.config import Config, ConfigError

    try:
        config = Config(dvc_dir=str(root / ".dvc"))
    except (ConfigError, OSError) as err:
        raise BadInput(f"{root / '.dvc'}: DVC cannot read its config", [str(err)]) from None
    name = config["core"].get("remote")
    if not name:
        return None
    section = config["remote"].get(name)
    if section is None:
        raise BadInput(
            f"DVC's default remote {name!r} (core.remote) is not defined",
            ["list the remotes: dvc remote list; choose one: dvc remote default NAME"],
        )
    return Remote(str(name), safe_url(str(section.get("url", ""))))


def safe_url(url: str) -> str:
    """``url`` without a ``user:password@`` part (never shown or recorded)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def plan_push(cfg: DictConfig, required: str | None = None) -> PushPlan:
    """The push plan for the project's data. ``required`` (the reason a push must be possible, e.g.
    ``pool.push.mode=always``) turns an untracked folder or a missing remote into BadInput."""
    settings = push_settings(cfg)
    target = dvc_data(cfg)
    remote = default_remote(target.root) if target is not None else None
    if required and target is None:
        raise BadInput(
            f"{required} needs the data folder tracked by DVC in this project, and it is not; nothing was changed",
            [f"track it: cd {project_root()} && dvc add {cfg.paths.data}"],
        )
    if required and remote is None:
        raise BadInput(
            f"{required} needs a DVC default remote, and there is none; nothing was changed",
            [
                "add one: dvc remote add -d NAME s3://bucket/path",
                "S3-compatible server: dvc remote modify NAME endpointurl http://HOST:PORT",
                "credentials (never committed): dvc remote modify --local NAME access_key_id ID "
                "(and secret_access_key), or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY",
            ],
        )
    return PushPlan(settings, target, remote)


# --------------------------------------------------------------------------- pushing


def push(plan: PushPlan, command: str, timeout: float | None, after_change: bool = False) -> PushResult:
    """Push the current data version, then any earlier owed version, to the plan's remote.

    The version is marked owed before the push starts (a push killed midway stays owed); what was
    delivered leaves the marker. A failure is logged as a WARNING (``after_change``: the push right
    after the command's own change); it never raises.
    """
    assert plan.target is not None and plan.remote is not None
    target, remote, settings = plan.target, plan.remote, plan.settings
    version = target.version()
    owe(settings, remote, version, command)
    log.info("pushing data version %s to DVC remote %s", version, remote)
    started = time.monotonic()
    ok, uploaded, error = _dvc_push(target, remote, settings.jobs, timeout)
    result = PushResult(command, asdict(remote), version, ok, uploaded, error)
    if ok:
        earlier = [v for v in owed_versions(settings) if v != version]
        result.older, result.lost, failed = _push_from_cache(target, remote, earlier, settings.jobs)
        result.still_owed = settled(settings, remote, [version, *result.older, *result.lost], failed)
        if failed:
            result.ok, result.error = False, "; ".join(f"earlier version {v}: {why}" for v, why in failed.items())
        else:
            _write_json(settings.state_dir / LAST_PUSH_FILE, _last_push(result, target))
    else:
        result.still_owed = settled(settings, remote, [], {version: error})
    result.seconds = round(time.monotonic() - started, 2)
    if result.ok:
        log.info("%s", result.summary())
    else:
        warn_failed(result, settings, after_change)
    return result


def retry_pending(plan: PushPlan, command: str) -> PushResult | None:
    """Retry an owed push first (None when nothing is owed, pushing is off or impossible)."""
    if plan.settings.mode == "off" or not plan.possible:
        return None
    pending = read_pending(plan.settings)
    if pending is None:
        return None
    log.info(
        "retrying the push owed to DVC remote %s since %s (%d data version(s))",
        plan.remote,
        pending.get("since"),
        len(pending.get("versions") or []),
    )
    return push(plan, f"retry before {command}", plan.settings.timeout)


def warn_failed(result: PushResult, settings: PushSettings, after_change: bool) -> None:
    """The loud WARNING of a failed push: the remote, the reason, what is kept and what retries it."""
    where = f"DVC remote '{result.remote['name']}' ({result.remote['url']})"
    since = (read_pending(settings) or {}).get("since")
    kept = (
        "The local change is complete and kept; nothing was rolled back (do not repeat the command)."
        if after_change
        else f"Nothing local changed; the data stays owed to the remote since {since}."
    )
    log.warning(
        "PUSH FAILED: data version %s is NOT on %s: %s\n  %s\n"
        "  Owed pushes are recorded in %s: the next detloop command that changes data, `detloop pool status` "
        "and `detloop pool push` retry them.",
        result.version,
        where,
        result.error,
        kept,
        _shown(settings.state_dir / PENDING_FILE),
    )


def _dvc_push(target: DvcData, remote: Remote, jobs: int | None, timeout: float | None) -> tuple[bool, int, str]:
    """``dvc push -r REMOTE <data>.dvc`` in the project root; (ok, objects uploaded, error reason)."""
    command = [sys.executable, "-m", "dvc", "--wait-for-lock", "push", "-r", remote.name]
    command += ["-j", str(jobs)] if jobs else []
    command.append(target.dvc_file.name)
    proc = subprocess.Popen(
        command,
        cwd=target.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # stopped as a group on a timeout
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc)
        return False, 0, f"no result within {timeout:g} s (pool.push.timeout); the push was stopped"
    finally:
        if proc.poll() is None:  # interrupted (Ctrl-C): the push stops with us
            _stop(proc)
    if proc.returncode != 0:
        return False, 0, dvc_error(err or out, proc.returncode)
    return True, pushed_count(out), ""


def _stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def pushed_count(output: str) -> int:
    """Objects uploaded, from ``dvc push`` output (``5 files pushed``; ``Everything is up to date.`` = 0)."""
    found = re.search(r"(\d+) files? pushed", output)
    return int(found.group(1)) if found else 0


def dvc_error(output: str, returncode: int) -> str:
    """The reason in DVC's error output, without its boilerplate."""
    errors = [line.strip()[len("ERROR:") :].strip() for line in output.splitlines() if line.startswith("ERROR:")]
    if errors:
        return "; ".join(e.removeprefix("unexpected error - ") for e in errors)
    lines = [line.strip() for line in output.splitlines() if line.strip() and "Having any troubles" not in line]
    return lines[-1] if lines else f"dvc push exited with {returncode}"


def _push_from_cache(
    target: DvcData, remote: Remote, versions: list[str], jobs: int | None
) -> tuple[list[str], list[str], dict[str, str]]:
    """Push superseded data versions from the local DVC cache (files first, then the ``.dir`` listing).

    ``dvc push`` only knows the version ``data.dvc`` holds now; an owed version that a later change
    superseded is found by its ``.dir`` object. Returns (pushed, lost, {version: why it failed}); lost
    versions are no longer in the cache (``dvc gc``): they can never be pushed and are warned about.
    The pool is append-only, so every pool sample of a lost version is in the current one.
    """
    if not versions:
        return [], [], {}
    from dvc.repo import Repo
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree
    from dvc_objects.errors import ObjectFormatError

    pushed, lost, failed = [], [], {}
    try:
        repo = Repo(str(target.root))
    except Exception as err:  # noqa: BLE001  (the versions stay owed; the next push tries again)
        return [], [], {version: f"DVC cannot open the repository: {err}" for version in versions}
    with repo:
        for version in versions:
            listing = HashInfo("md5", version)
            try:
                tree = Tree.load(repo.cache.local, listing)
            except (FileNotFoundError, ObjectFormatError):
                log.warning(
                    "earlier data version %s can no longer be pushed: its .dir listing is not in the local DVC "
                    "cache (dvc gc?); dropped from the owed pushes (its pool samples are in the current version)",
                    version,
                )
                lost.append(version)
                continue
            try:
                done = repo.cloud.push({oid for _, _, oid in tree} | {listing}, jobs=jobs, remote=remote.name)
            except Exception as err:  # noqa: BLE001  (any DVC or storage error: the version stays owed)
                failed[version] = dvc_error(str(err), 1)
                continue
            if done.failed:
                failed[version] = f"{len(done.failed)} object(s) failed to upload"
            else:
                pushed.append(version)
    for version, why in failed.items():
        log.warning("earlier data version %s not pushed: %s", version, why)
    return pushed, lost, failed


# --------------------------------------------------------------------------- the marker and the last push


def read_pending(settings: PushSettings) -> dict | None:
    """The owed-push marker, or None when nothing is owed. An unreadable marker still counts as owed."""
    path = settings.state_dir / PENDING_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        log.warning("%s is unreadable (%s): treating the current data version as owed", path, err)
        return {"since": None, "versions": [], "unreadable": str(err)}
    return data


def owed_versions(settings: PushSettings) -> list[str]:
    pending = read_pending(settings) or {}
    return [str(v["version"]) for v in pending.get("versions") or [] if isinstance(v, dict) and v.get("version")]


def owe(settings: PushSettings, remote: Remote, version: str | None, command: str) -> None:
    """Record ``version`` as owed to ``remote`` (before a push starts, or when a push was not attempted)."""
    with locked(settings.state_dir):
        data = _pending_for_update(settings)
        if version and version not in {v.get("version") for v in data["versions"]}:
            data["versions"].append({"version": version, "command": command, "recorded_at": utc_now()})
        data["remote"], data["url"] = remote.name, remote.url
        data["since"] = data.get("since") or utc_now()
        _write_json(settings.state_dir / PENDING_FILE, data)


def settled(settings: PushSettings, remote: Remote, delivered: list[str], failed: dict[str, str]) -> list[str]:
    """Take the delivered versions off the marker and record the failures; returns the versions still owed."""
    with locked(settings.state_dir):
        data = _pending_for_update(settings)
        data["versions"] = [v for v in data["versions"] if v.get("version") not in delivered]
        data.pop("unreadable", None)
        path = settings.state_dir / PENDING_FILE
        if not data["versions"]:
            path.unlink(missing_ok=True)
            fsync_dir(settings.state_dir)
            return []
        data["attempts"] = int(data.get("attempts") or 0) + 1
        data["last_attempt"] = utc_now()
        if failed:
            data["last_error"] = "; ".join(failed.values())
        data["remote"], data["url"] = remote.name, remote.url
        data["since"] = data.get("since") or utc_now()
        _write_json(path, data)
        return [v["version"] for v in data["versions"]]


def _pending_for_update(settings: PushSettings) -> dict:
    data = read_pending(settings) or {}
    versions = [v for v in data.get("versions") or [] if isinstance(v, dict) and v.get("version")]
    return {**data, "versions": versions}


def read_last_push(settings: PushSettings) -> dict | None:
    path = settings.state_dir / LAST_PUSH_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _last_push(result: PushResult, target: DvcData) -> dict:
    return {
        "version": result.version,
        "remote": result.remote["name"],
        "url": result.remote["url"],
        "pushed_at": utc_now(),
        "uploaded": result.uploaded,
        "command": result.command,
        "dvc_file": target.dvc_file.name,
    }


def _write_json(path: Path, data: dict) -> None:
    """Write through a temporary file and an atomic rename (:func:`detloop.data.review.replace_text`)."""
    from detloop.data.review import replace_text

    path.parent.mkdir(parents=True, exist_ok=True)
    replace_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _shown(path: Path) -> str:
    try:
        return path.relative_to(project_root()).as_posix()
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------- around a command that changes data


@dataclass
class DataChange:
    """What happened around a command that changed data: the retry before it and the push after it."""

    command: str
    retry: PushResult | None = None
    push: PushResult | None = None

    def exit_code(self, code: int = 0) -> int:
        """``code``, or :data:`PUSH_FAILED_EXIT` when the command's own push failed."""
        return PUSH_FAILED_EXIT if code == 0 and self.push is not None and not self.push.ok else code

    def lines(self) -> list[str]:
        """The retry's and the push's summary lines (nothing when neither ran)."""
        lines = []
        if self.retry is not None and (self.push is None or self.retry.ok):
            lines.append(f"retry: {self.retry.summary()}")
        if self.push is not None:
            lines.append(self.push.summary())
        return lines


@contextlib.contextmanager
def data_change(cfg: DictConfig, command: str, push_after: bool = True) -> Iterator[DataChange]:
    """Around a command that changes ``data/``: an owed push is retried first; after the command, a new
    data version is pushed (``push_after``, as ``pool.push.mode`` says).

    With ``pool.push.mode=always`` a missing remote raises BadInput before the command runs. When the
    retry has just failed the new version is recorded as owed without another wait for the remote.
    """
    settings = push_settings(cfg)
    required = "pool.push.mode=always" if push_after and settings.mode == "always" else None
    plan = plan_push(cfg, required)
    change = DataChange(command)
    change.retry = retry_pending(plan, command)
    before = plan.target.version() if plan.target is not None else None
    yield change
    after = plan.target.version() if plan.target is not None else None
    if not push_after or settings.mode == "off" or after is None or after == before:
        return
    if plan.remote is None:
        log.info(
            "data version %s is on this disk only: DVC has no default remote (pool.push.mode=auto; "
            "add one with `dvc remote add -d NAME s3://bucket/path`)",
            after,
        )
        return
    if change.retry is not None and not change.retry.ok:
        change.push = _owed_without_trying(plan, after, command, change.retry)
    else:
        change.push = push(plan, command, settings.timeout, after_change=True)


def _owed_without_trying(plan: PushPlan, version: str, command: str, retry: PushResult) -> PushResult:
    """The retry before the command failed a moment ago: record the new version as owed, do not wait again."""
    assert plan.remote is not None
    owe(plan.settings, plan.remote, version, command)
    result = PushResult(
        command,
        asdict(plan.remote),
        version,
        ok=False,
        error=f"not attempted: the retry just before failed ({retry.error})",
        attempted=False,
        still_owed=owed_versions(plan.settings),
    )
    warn_failed(result, plan.settings, after_change=True)
    return result


# --------------------------------------------------------------------------- status


def remote_status(cfg: DictConfig, retry: bool = True) -> dict:
    """The remote's state for ``detloop pool status``, after retrying an owed push (``retry``)."""
    plan = plan_push(cfg)
    result = retry_pending(plan, "pool status") if retry else None
    settings, target, remote = plan.settings, plan.target, plan.remote
    current = target.version() if target is not None else None
    last = read_last_push(settings) if target is not None else None
    pushed = bool(last and remote and current and last.get("version") == current and last.get("remote") == remote.name)
    return {
        "mode": settings.mode,
        "tracked": target is not None,
        "remote": asdict(remote) if remote is not None else None,
        "current_version": current,
        "current_pushed": pushed,
        "pending": read_pending(settings) if target is not None else None,
        "last_push": last,
        "retry": result.to_dict() if result is not None else None,
        "marker": _shown(settings.state_dir / PENDING_FILE),
    }


def format_remote_status(status: dict) -> list[str]:
    """``detloop pool status`` lines about the DVC remote."""
    mode = f"pool.push.mode={status['mode']}"
    if not status["tracked"]:
        return [f"remote: the data folder is not tracked by DVC in this project: nothing to push ({mode})"]
    remote = status["remote"]
    if remote is None:
        return [
            f"remote: none: DVC has no default remote, the pool lives on this disk only ({mode}; "
            "add one with `dvc remote add -d NAME s3://bucket/path`)"
        ]
    where = f"'{remote['name']}' ({remote['url']})"
    lines = []
    retry = status["retry"]
    if retry is not None:
        lines.append(f"remote: retried the owed push now: {'pushed' if retry['ok'] else 'failed: ' + retry['error']}")
    pending = status["pending"]
    if pending is not None:
        versions = len(pending.get("versions") or [])
        error = f"; last error: {pending['last_error']}" if pending.get("last_error") else ""
        lines.append(
            f"remote: pool NOT yet pushed to {where} since {pending.get('since')} ({versions} data version(s) owed, "
            f"{status['marker']}{error}); `detloop pool push` retries"
        )
    elif status["current_pushed"]:
        last = status["last_push"]
        lines.append(f"remote: data version {status['current_version']} pushed to {where} at {last['pushed_at']}")
    else:
        last = status["last_push"]
        before = f"last push: {last['version']} at {last['pushed_at']}" if last else "no push by detloop yet"
        lines.append(
            f"remote: data version {status['current_version']} not pushed to {where} yet ({before}); "
            "`detloop pool push` pushes it"
        )
    if status["mode"] == "off":
        lines.append(f"remote: automatic pushes are off ({mode})")
    return lines


# --------------------------------------------------------------------------- before training


def push_for_training(cfg: DictConfig, stage: str) -> PushResult | None:
    """Put the data version a training stage reads on the remote before it trains (as ``pool.push.mode`` says).

    A registered version's ``lineage.data_dvc_md5`` must resolve on another machine with ``dvc pull``, so
    the version recorded in ``data.dvc`` goes to the remote first (nothing to upload when a review pushed
    it already). A failed push does not stop the training: it is logged as a WARNING and recorded as owed,
    and the next command that touches data retries it. None when pushing is off or impossible (no remote:
    the single-machine default).
    """
    plan = plan_push(cfg, "pool.push.mode=always" if push_settings(cfg).mode == "always" else None)
    if plan.settings.mode == "off" or not plan.possible:
        return None
    assert plan.target is not None
    version = plan.target.version()
    last = read_last_push(plan.settings)
    if last and last.get("version") == version and last.get("remote") == plan.remote.name:
        return None  # a review or an earlier stage pushed this version already
    return push(plan, f"stage {stage}", plan.settings.timeout)
