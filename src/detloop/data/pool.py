"""The human-verified fine-tune pool: reading it, and the policy that decides when to fine-tune.

The pool is append-only (``detloop review`` is its only writer). Each row's ``split`` was fixed when
the sample was accepted and is read as stored, never recomputed.

Fine-tune trigger policy (document section 5; ``conf/trigger``). Counted on the *new train samples*:
the pool rows after the first ``pool.size`` rows of the last fine-tune (the manifest is append-only)
whose split is train, i.e. what the next fine-tune sees for the first time.

* the floor: no strategy starts a fine-tune below ``trigger.min_train_samples`` (50) new train samples
  ("do NOT fine-tune daily with fewer than 50 samples");
* strategies (``trigger.strategies``, any one of them starts a fine-tune):
  by volume: at least ``trigger.volume.min_new_samples`` new train samples;
  by schedule: once per calendar period of ``trigger.schedule.every_days`` days from
  ``trigger.schedule.origin``, while no fine-tune was registered in the current period;
  by performance: the monitor's flag ``trigger.performance_flag`` was raised after the last fine-tune;
* ``trigger.force=true`` starts a fine-tune regardless, below the floor too, and is recorded as forced.

Stage ``trigger`` writes :func:`trigger_state` (schedule period, flag hash) for DVC, so ``dvc repro``
reruns ``mix`` when the clock passes a period boundary or the monitor raises a flag.

Retrain check (``conf/retrain``): once ``retrain.threshold`` (2000) verified samples were added since the
newest base was trained, a new base is trained from scratch on anchor + pool (stage ``retrain``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from detloop.core.config import resolve_path
from detloop.core.env import in_project, project_root
from detloop.core.errors import BadInput
from detloop.data.manifest import MANIFEST, read_manifest, sha256_file
from detloop.data.yolo_format import is_image_name

log = logging.getLogger(__name__)

REQUIRED_FIELDS = ("id", "sha256", "reviewer", "verified_at", "split")
STRATEGIES = ("volume", "schedule", "performance")  # document section 5; trigger.strategies names a subset


@dataclass(frozen=True)
class TriggerStatus:
    """The trigger policy's decision for the current pool."""

    pool_size: int
    split_counts: dict[str, int]
    new_samples: int  # pool rows (every split) appended since the last fine-tune's pool
    min_train_samples: int  # the floor (trigger.min_train_samples)
    triggered: bool
    reasons: list[str]  # one recorded line per strategy, the floor and force: state and why, with the numbers
    forced: bool
    message: str  # e.g. "waiting: 23/50 new train samples"
    new_train_samples: int = 0  # of new_samples, those with split=train: what the floor and volume count
    triggers: dict[str, bool] = field(default_factory=dict)  # volume / schedule / performance / force -> started it
    strategies: dict[str, dict] = field(default_factory=dict)  # name -> {enabled, due, fired, reason}
    last_finetune: dict | None = None  # {version, pool_size, created} of the newest fine-tune, or None
    now: str = ""  # the time the policy was evaluated at (ISO 8601)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- reading the pool


def pool_rows(cfg: DictConfig) -> list[dict]:
    """Every pool manifest row, in the order the samples were accepted."""
    return read_manifest(resolve_path(cfg, "pool") / MANIFEST)


def split_counts(cfg: DictConfig, rows: list[dict] | None = None) -> dict[str, int]:
    """Samples per pool split (every configured split present, zeros included)."""
    counts = Counter(row.get("split") for row in (pool_rows(cfg) if rows is None else rows))
    return {name: counts.get(name, 0) for name in cfg.pool.split} | {
        str(name): n for name, n in counts.items() if name not in cfg.pool.split
    }


def pool_samples(cfg: DictConfig, split: str) -> list[Path]:
    """Image paths of the pool samples in ``split`` (train | val | holdout), in acceptance order.

    Raises BadInput for an unknown split or a row whose image is missing.
    """
    if split not in cfg.pool.split:
        raise BadInput(f"pool split {split!r} does not exist", [f"pool.split: {', '.join(cfg.pool.split)}"])
    images = _images_by_id(resolve_path(cfg, "pool") / "images")
    rows = [row for row in pool_rows(cfg) if row.get("split") == split]
    missing = [
        f"{resolve_path(cfg, 'pool') / 'images'}/{row['id']}.*: image of pool sample {row['id']} is missing"
        for row in rows
        if row["id"] not in images
    ]
    if missing:
        raise BadInput(f"the pool is incomplete: {len(missing)} image(s) missing", missing)
    return [images[row["id"]] for row in rows]


def _images_by_id(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and is_image_name(p)}


def check_reviewed(cfg: DictConfig) -> None:
    """Raise BadInput unless every pool sample has a review record (reviewer, time, split) and its files,
    and every image in the pool folder has a manifest row: nothing unreviewed is ever trained on."""
    pool = resolve_path(cfg, "pool")
    rows = pool_rows(cfg)
    images = _images_by_id(pool / "images")
    problems = []
    for number, row in enumerate(rows, start=1):
        missing = [key for key in REQUIRED_FIELDS if not row.get(key)]
        if missing:
            problems.append(f"{pool / MANIFEST}:{number}: no {', '.join(missing)} (not a reviewed sample)")
        elif row["split"] not in cfg.pool.split:
            problems.append(f"{pool / MANIFEST}:{number}: split {row['split']!r} is not one of pool.split")
        if row.get("id") and row["id"] not in images:
            problems.append(f"{pool / MANIFEST}:{number}: image of {row['id']} is missing from {pool / 'images'}")
        if row.get("id") and not (pool / "labels" / f"{row['id']}.txt").is_file():
            problems.append(f"{pool / MANIFEST}:{number}: labels of {row['id']} are missing from {pool / 'labels'}")
    known = Counter(row.get("id") for row in rows)
    problems += [f"{pool / MANIFEST}: id {key} appears {n} times" for key, n in known.items() if n > 1]
    problems += [
        f"{path}: in the pool folder without a review record" for key, path in images.items() if key not in known
    ]
    if problems:
        raise BadInput(f"{pool}: the pool holds unreviewed or incomplete samples", problems)


def retrain_status(cfg: DictConfig, last_base: dict | None) -> dict:
    """Whether a base retrain from scratch is due (document section 6: "merge all data at 2000+ new samples").

    ``last_base`` is ``{version, pool_size}`` of the newest registered base (promoted or not), or None.
    Due when the pool grew by ``retrain.threshold`` samples since that base was trained, or with
    ``retrain.force=true``. A base retrain that the gates rejected still counts: the next one waits
    for another ``threshold`` samples (or ``retrain.force``).
    """
    rows = pool_rows(cfg)
    threshold = int(cfg.retrain.threshold)
    since = int(last_base["pool_size"]) if last_base else 0
    new = max(len(rows) - since, 0)
    forced = bool(cfg.retrain.force)
    where = f"base v{last_base['version']} (pool {since})" if last_base else "the anchor-only base"
    due = forced or new >= threshold
    if forced:
        message = f"base retrain forced (retrain.force=true): {new}/{threshold} new verified samples since {where}"
    elif due:
        message = f"base retrain due: {new} >= {threshold} new verified samples since {where}"
    else:
        message = f"base retrain waiting: {new}/{threshold} new verified samples since {where}"
    return {
        "due": due,
        "forced": forced,
        "threshold": threshold,
        "pool_size": len(rows),
        "new_since_base": new,
        "last_base": last_base,
        "message": message,
    }


# --------------------------------------------------------------------------- trigger policy


def trigger_status(cfg: DictConfig, last_finetune: dict | None, now: datetime | None = None) -> TriggerStatus:
    """Whether a fine-tune starts now: an enabled strategy is due and the floor is met, or ``force``.

    ``last_finetune`` is ``{version, pool_size, created}`` (created: ISO time) of the newest registered
    fine-tune, or None when there is none (then every pool sample is new). ``now`` defaults to
    ``trigger.now`` or the clock. Raises BadInput naming the key of a bad ``conf/trigger`` value.
    """
    check_trigger_config(cfg)
    now = now or clock(cfg)
    rows = pool_rows(cfg)
    fresh = new_rows(rows, last_finetune)
    new_train = sum(1 for row in fresh if row.get("split") == "train")
    floor = int(cfg.trigger.min_train_samples)
    checks = {
        "volume": volume_trigger(new_train, int(cfg.trigger.volume.min_new_samples)),
        "schedule": schedule_trigger(schedule_of(cfg), last_finetune, now),
        "performance": performance_trigger(performance_flag_path(cfg), last_finetune),
    }
    enabled = set(cfg.trigger.strategies)
    floor_met = new_train >= floor
    strategies = {
        name: {"enabled": name in enabled, "due": due, "fired": name in enabled and due and floor_met, "reason": why}
        for name, (due, why) in checks.items()
    }
    forced = bool(cfg.trigger.force)
    fired = {name: s["fired"] for name, s in strategies.items()} | {"force": forced}
    reasons = [strategy_line(name, s, new_train, floor) for name, s in strategies.items()]
    reasons.append(floor_line(new_train, floor))
    reasons.append("force: trigger.force=true starts a fine-tune regardless of the policy" if forced else "force: off")
    return TriggerStatus(
        pool_size=len(rows),
        split_counts=split_counts(cfg, rows),
        new_samples=len(fresh),
        new_train_samples=new_train,
        min_train_samples=floor,
        triggered=any(fired.values()),
        reasons=reasons,
        forced=forced,
        message=trigger_message(fired, new_train, floor, [n for n in STRATEGIES if n in enabled]),
        triggers=fired,
        strategies=strategies,
        last_finetune=last_finetune,
        now=now.isoformat(timespec="seconds"),
    )


def new_rows(rows: list[dict], last_finetune: dict | None) -> list[dict]:
    """The pool rows appended since the last fine-tune's pool: all rows after its first ``pool.size``.

    The manifest is append-only, so the first ``pool.size`` rows are the ones that fine-tune saw.
    """
    if last_finetune is None:
        return list(rows)
    seen = int(last_finetune["pool_size"])
    if seen > len(rows):
        log.warning("the pool (%d) is smaller than at the last fine-tune (%d): it is append-only", len(rows), seen)
    return list(rows[seen:])


def strategy_line(name: str, state: dict, new_train: int, floor: int) -> str:
    """One recorded line per strategy: ``volume: 62 new train samples >= 50 (...)``, ``schedule: off (...)``.

    A disabled strategy records only that it is off, so the record does not change with the clock.
    """
    if not state["enabled"]:
        return f"{name}: off (not in trigger.strategies)"
    line = f"{name}: {state['reason']}"
    if state["due"] and not state["fired"]:
        line += f"; held back by the floor: {new_train}/{floor} new train samples (trigger.min_train_samples)"
    return line


def floor_line(new_train: int, floor: int) -> str:
    if new_train >= floor:
        return f"floor: {new_train}/{floor} new train samples (trigger.min_train_samples): met"
    return (
        f"floor: {new_train}/{floor} new train samples (trigger.min_train_samples): not met, "
        "no strategy starts a fine-tune below it"
    )


def volume_trigger(new_train: int, minimum: int) -> tuple[bool, str]:
    """By volume: ``minimum`` new pool train samples since the last fine-tune's pool."""
    if new_train >= minimum:
        return True, f"{new_train} new train samples >= {minimum} (trigger.volume.min_new_samples)"
    return False, f"{new_train}/{minimum} new train samples (trigger.volume.min_new_samples)"


@dataclass(frozen=True)
class Schedule:
    """Calendar periods of ``every_days`` days, fixed from ``origin`` (not from the last fine-tune)."""

    every_days: float
    origin: datetime

    def period(self, when: datetime) -> int:
        """The index of the period holding ``when`` (period k starts at origin + k * every_days)."""
        return math.floor((when - self.origin).total_seconds() / (self.every_days * 86400.0))

    def start(self, index: int) -> datetime:
        return self.origin + timedelta(days=self.every_days * index)


def schedule_of(cfg: DictConfig) -> Schedule:
    node = cfg.trigger.schedule
    return Schedule(float(node.every_days), parse_time(node.origin, "trigger.schedule.origin"))


def schedule_trigger(schedule: Schedule, last_finetune: dict | None, now: datetime) -> tuple[bool, str]:
    """By schedule: due once per period, while no fine-tune was registered in the current period."""
    current = schedule.period(now)
    span = (
        f"period {current} ({_time(schedule.start(current))} .. {_time(schedule.start(current + 1))}, "
        f"every {schedule.every_days:g} days)"
    )
    if last_finetune is None:
        return True, f"due: {span}, no fine-tune yet"
    created = parse_time(last_finetune["created"], "last fine-tune's creation time")
    done = schedule.period(created)
    where = f"fine-tune v{last_finetune['version']} ({_time(created)}, period {done})"
    if done >= current:
        return False, f"not due: {where} is in the current {span}"
    return True, f"due: {span}; the last was {where}"


def performance_trigger(flag: Path, last_finetune: dict | None = None, new: int | None = None) -> tuple[bool, str]:
    """By performance: the monitor's flag file exists and was raised after the last fine-tune was registered.

    A flag older than the last fine-tune was answered by it (a sweep's jobs leave the flag in place).
    ``new`` is ignored (callers of the former signature pass it): the floor is checked for every
    strategy alike, in :func:`trigger_status`.
    """
    if not flag.is_file():
        return False, f"no flag ({_shown(flag)})"
    raised = flag_raised_at(flag)
    what = f"flag {_shown(flag)} raised {_time(raised)}: {read_flag_reason(flag)}"
    if last_finetune is not None:
        created = parse_time(last_finetune["created"], "last fine-tune's creation time")
        if raised <= created:
            return False, f"{what}; answered by fine-tune v{last_finetune['version']} ({_time(created)})"
    return True, what


def read_flag_reason(flag: Path) -> str:
    """The ``reason`` of a performance flag file; a flag that cannot be read still counts as set."""
    try:
        data = json.loads(flag.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"{flag} is not readable JSON: {err}"
    reason = data.get("reason") if isinstance(data, dict) else None
    return str(reason) if reason else f"{flag} gives no reason"


def flag_raised_at(flag: Path) -> datetime:
    """When the monitor raised ``flag``: its ``raised_at`` (ISO 8601), else the file's modification time."""
    try:
        data = json.loads(flag.read_text(encoding="utf-8"))
        return parse_time(data["raised_at"], f"{flag}: raised_at")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError, BadInput):
        return datetime.fromtimestamp(flag.stat().st_mtime, UTC)


def _shown(path: Path) -> str:
    """A path as users configured it: relative to the project root when inside it (same on every machine)."""
    try:
        return path.relative_to(project_root()).as_posix()
    except ValueError:
        return str(path)


def _time(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def consume_performance_flag(cfg: DictConfig, version: str) -> str | None:
    """After fine-tune ``version`` is registered, the monitor's flag has been answered: rename it.

    The flag moves to ``<name>.consumed-v<version>.json`` beside it (kept as a record); a later
    drop must raise it again. Returns the flag's reason, or None when no flag was set.
    """
    flag = performance_flag_path(cfg)
    if not flag.is_file():
        return None
    reason = read_flag_reason(flag)
    flag.replace(flag.with_name(f"{flag.stem}.consumed-v{version}{flag.suffix or '.json'}"))
    return reason


def performance_flag_path(cfg: DictConfig) -> Path:
    return in_project(cfg.trigger.performance_flag)


def performance_flags(cfg: DictConfig) -> list[Path]:
    """The monitor's flag and its answered copies (``consume_performance_flag``), the flags raised so far."""
    flag = performance_flag_path(cfg)
    answered = sorted(flag.parent.glob(f"{flag.stem}.consumed-v*")) if flag.parent.is_dir() else []
    return [p for p in (flag, *answered) if p.is_file()]


def trigger_message(fired: dict[str, bool], new_train: int, floor: int, enabled: list[str]) -> str:
    """One line for users: ``waiting: 23/50 new train samples``, ``fine-tune due (volume): 62/50 ...``."""
    counts = f"{new_train}/{floor} new train samples"
    if fired.get("force"):
        return f"forced: {counts} (trigger.force=true)"
    names = [name for name, on in fired.items() if on]
    if names:
        return f"fine-tune due ({', '.join(names)}): {counts}"
    if new_train >= floor:
        return f"waiting: {counts}, no strategy due ({', '.join(enabled) or 'none enabled'})"
    return f"waiting: {counts}"


# --------------------------------------------------------------------------- the trigger state (stage trigger)


def trigger_state(cfg: DictConfig, now: datetime | None = None) -> dict:
    """What can start a fine-tune without a change to the pool or the config, as stable content.

    ``schedule``: the current period (when the schedule strategy is on); ``performance``: a hash of
    the monitor's flags raised so far, live or answered (when the performance strategy is on). The
    time itself is not in it: the content changes only when a period boundary passes or a flag is
    raised, and answering a flag (a rename) leaves it unchanged. Stage ``trigger`` writes it.
    """
    check_trigger_config(cfg)
    enabled = set(cfg.trigger.strategies)
    state: dict = {"schedule": None, "performance": None}
    if "schedule" in enabled:
        schedule = schedule_of(cfg)
        period = schedule.period(now or clock(cfg))
        state["schedule"] = {"period": period, "starts": _time(schedule.start(period))}
    if "performance" in enabled:
        hashes = sorted(sha256_file(p) for p in performance_flags(cfg))
        digest = hashlib.sha256("\n".join(hashes).encode()).hexdigest()[:16] if hashes else None
        state["performance"] = {"flags": len(hashes), "sha256": digest}
    return state


# --------------------------------------------------------------------------- configuration and clock


def clock(cfg: DictConfig) -> datetime:
    """``trigger.now`` (tests and drills; ``DETLOOP_NOW``) or the current UTC time."""
    value = cfg.trigger.get("now")
    return parse_time(value, "trigger.now") if value is not None else datetime.now(UTC)


def parse_time(value, key: str) -> datetime:
    """An ISO 8601 time (naive = UTC) as an aware datetime; BadInput names ``key``."""
    try:
        when = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    except ValueError:
        raise BadInput(f"{key}: not an ISO 8601 time", [f"{key}={value!r}: e.g. 2025-03-03T00:00:00Z"]) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def check_trigger_config(cfg: DictConfig) -> None:
    """Raise BadInput listing every bad ``conf/trigger`` value, each with its key."""
    t = cfg.trigger
    problems = []
    strategies = t.get("strategies")
    if not isinstance(strategies, ListConfig | list):
        problems.append(f"trigger.strategies={strategies!r}: must be a list of {' | '.join(STRATEGIES)}")
    else:
        problems += [
            f"trigger.strategies: unknown strategy {name!r} (one of {', '.join(STRATEGIES)})"
            for name in strategies
            if name not in STRATEGIES
        ]
    for key, value in (
        ("trigger.min_train_samples", t.get("min_train_samples")),
        ("trigger.volume.min_new_samples", OmegaConf.select(t, "volume.min_new_samples")),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{key}={value!r}: must be a whole number >= 1")
    every = OmegaConf.select(t, "schedule.every_days")
    if isinstance(every, bool) or not isinstance(every, int | float) or not every > 0:
        problems.append(f"trigger.schedule.every_days={every!r}: must be a number of days > 0")
    if not isinstance(t.get("force"), bool):
        problems.append(f"trigger.force={t.get('force')!r}: must be true or false")
    if not t.get("performance_flag"):
        problems.append("trigger.performance_flag: must name the monitor's flag file")
    times = {"trigger.schedule.origin": OmegaConf.select(t, "schedule.origin")}
    if t.get("now") is not None:
        times["trigger.now"] = t.get("now")
    for key, value in times.items():
        try:
            parse_time(value, key)
        except BadInput as err:
            problems += err.problems
    if problems:
        raise BadInput("bad trigger configuration (conf/trigger/default.yaml)", problems)


# --------------------------------------------------------------------------- status report


def status_report(cfg: DictConfig, status: TriggerStatus, retrain: dict) -> dict:
    """``detloop pool status --json``: the trigger status plus the retrain check (``retrain_status``)."""
    return {**status.to_dict(), "retrain": retrain}


def format_status(cfg: DictConfig, status: TriggerStatus, retrain: dict) -> str:
    """``detloop pool status`` for the terminal: the pool, the floor, each strategy, force and the decision."""
    splits = ", ".join(f"{name} {n}" for name, n in status.split_counts.items())
    last = status.last_finetune
    since = (
        f"since fine-tune v{last['version']} ({last['created']}, pool {last['pool_size']})"
        if last
        else "no fine-tune yet: every sample is new"
    )
    enabled = [name for name, s in status.strategies.items() if s["enabled"]]
    lines = [
        f"pool: {status.pool_size} verified samples ({splits}) in {resolve_path(cfg, 'pool')}",
        f"new: {status.new_samples} samples, {status.new_train_samples} of them train ({since})",
        floor_line(status.new_train_samples, status.min_train_samples),
        f"strategies (trigger.strategies: {', '.join(enabled) or 'none'}; any one starts a fine-tune):",
    ]
    for name, s in status.strategies.items():
        held = "; held back by the floor" if s["enabled"] and s["due"] and not s["fired"] else ""
        state = "on " if s["enabled"] else "off"
        lines.append(f"  [{'x' if s['fired'] else ' '}] {name:<11} {state}  {s['reason']}{held}")
    force = "on   trigger.force=true starts a fine-tune, below the floor too" if status.forced else "off"
    lines.append(f"  [{'x' if status.forced else ' '}] {'force':<11} {force}")
    if cfg.trigger.get("now") is not None:
        lines.append(f"now: {status.now} (trigger.now)")
    lines += [retrain["message"], status.message]
    return "\n".join(lines)
