"""The human-verified fine-tune pool: reading it, and the policy that decides when to fine-tune.

The pool is append-only (``detloop review`` is its only writer). Each row's ``split`` was fixed when
the sample was accepted and is read as stored, never recomputed.

Fine-tune trigger policy (document section 5; ``conf/trigger``):

* by volume: at least ``trigger.min_new_samples`` (50) verified samples since the last fine-tune;
* by schedule: ``trigger.schedule_days`` since the last fine-tune, and still at least
  ``min_new_samples`` new samples ("do NOT fine-tune daily with fewer than 50 samples");
* by performance: the monitor's flag file ``trigger.performance_flag`` exists, and there is at least
  one new sample to learn from;
* ``trigger.force=true`` starts a fine-tune regardless, and the run is recorded as forced.

Retrain check (``conf/retrain``): once ``retrain.threshold`` (2000) verified samples were added since the
newest base version was trained, a new base is trained from scratch on anchor + pool (stage ``retrain``).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from omegaconf import DictConfig

from detloop.core.config import resolve_path
from detloop.core.env import in_project, project_root
from detloop.core.errors import BadInput
from detloop.data.manifest import MANIFEST, read_manifest
from detloop.data.yolo_format import is_image_name

log = logging.getLogger(__name__)

REQUIRED_FIELDS = ("id", "sha256", "reviewer", "verified_at", "split")


@dataclass(frozen=True)
class TriggerStatus:
    """The trigger policy's decision for the current pool."""

    pool_size: int
    split_counts: dict[str, int]
    new_samples: int
    min_new_samples: int
    triggered: bool
    reasons: list[str]  # one line per trigger: its state and why
    forced: bool
    message: str  # e.g. "waiting: 23/50 new verified samples"
    triggers: dict[str, bool] = field(default_factory=dict)  # volume / schedule / performance / force -> fired
    last_finetune: dict | None = None  # {version, pool_size, created} of the newest fine-tune, or None

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
    """Whether a fine-tune starts now, by the trigger policy (volume, schedule, performance, force).

    ``last_finetune`` is ``{pool_size, created}`` (created: ISO time) of the newest registered
    fine-tune, or None when there is none (then every pool sample is new).
    """
    rows = pool_rows(cfg)
    new = new_samples(len(rows), last_finetune)
    minimum = int(cfg.trigger.min_new_samples)
    checks = {
        "volume": volume_trigger(new, minimum),
        "schedule": schedule_trigger(cfg.trigger.schedule_days, last_finetune, new, minimum, now),
        "performance": performance_trigger(performance_flag_path(cfg), new),
    }
    forced = bool(cfg.trigger.force)
    reasons = [reason for _, reason in checks.values()]
    reasons.append("force: trigger.force=true starts a fine-tune regardless of the policy" if forced else "force: off")
    fired = {name: on for name, (on, _) in checks.items()} | {"force": forced}
    return TriggerStatus(
        pool_size=len(rows),
        split_counts=split_counts(cfg, rows),
        new_samples=new,
        min_new_samples=minimum,
        triggered=any(fired.values()),
        reasons=reasons,
        forced=forced,
        message=trigger_message(fired, new, minimum),
        triggers=fired,
        last_finetune=last_finetune,
    )


def new_samples(pool_size: int, last_finetune: dict | None) -> int:
    """Verified samples added since the last fine-tune's pool (all of them when there was none)."""
    if last_finetune is None:
        return pool_size
    new = pool_size - int(last_finetune["pool_size"])
    if new < 0:
        log.warning(
            "the pool (%d) is smaller than at the last fine-tune (%s): it is append-only",
            pool_size,
            last_finetune["pool_size"],
        )
    return max(new, 0)


def volume_trigger(new: int, minimum: int) -> tuple[bool, str]:
    """By volume: enough new verified samples."""
    if new >= minimum:
        return True, f"volume: {new} new verified samples >= {minimum}"
    return False, f"volume: {new}/{minimum} new verified samples"


def schedule_trigger(
    schedule_days: float | None, last_finetune: dict | None, new: int, minimum: int, now: datetime | None = None
) -> tuple[bool, str]:
    """By schedule: the period has passed since the last fine-tune, and there are enough new samples."""
    if schedule_days is None:
        return False, "schedule: off (trigger.schedule_days is null)"
    days = days_since(last_finetune, now)
    since = "no fine-tune yet" if days is None else f"{days:.1f} days since the last fine-tune"
    if days is not None and days < float(schedule_days):
        return False, f"schedule: {since}, due after {schedule_days}"
    if new < minimum:
        return False, (
            f"schedule: due ({since}) but only {new}/{minimum} new verified samples; "
            f"never fine-tune on fewer than {minimum}"
        )
    return True, f"schedule: due ({since} >= {schedule_days}) with {new} >= {minimum} new verified samples"


def days_since(last_finetune: dict | None, now: datetime | None = None) -> float | None:
    """Days between the last fine-tune's creation and ``now`` (None when there was none)."""
    if last_finetune is None:
        return None
    created = datetime.fromisoformat(str(last_finetune["created"]))
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    return ((now or datetime.now(UTC)) - created).total_seconds() / 86400.0


def performance_trigger(flag: Path, new: int) -> tuple[bool, str]:
    """By performance: the monitor's flag file exists (its JSON says why); needs one new sample."""
    if not flag.is_file():
        return False, f"performance: no flag ({_shown(flag)})"
    why = read_flag_reason(flag)
    if new < 1:
        return False, f"performance: flagged ({why}) but no new verified samples since the last fine-tune"
    return True, f"performance: flagged ({why}), {new} new verified samples"


def read_flag_reason(flag: Path) -> str:
    """The ``reason`` of a performance flag file; a flag that cannot be read still counts as set."""
    try:
        data = json.loads(flag.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"{flag} is not readable JSON: {err}"
    reason = data.get("reason") if isinstance(data, dict) else None
    return str(reason) if reason else f"{flag} gives no reason"


def _shown(path: Path) -> str:
    """A path as users configured it: relative to the project root when inside it (same on every machine)."""
    try:
        return path.relative_to(project_root()).as_posix()
    except ValueError:
        return str(path)


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


def trigger_message(fired: dict[str, bool], new: int, minimum: int) -> str:
    """One line for users: ``waiting: 23/50 new verified samples``, ``fine-tune due (volume): ...``."""
    counts = f"{new}/{minimum} new verified samples"
    if fired.get("force"):
        return f"forced: {counts} (trigger.force=true)"
    names = [name for name, on in fired.items() if on]
    return f"fine-tune due ({', '.join(names)}): {counts}" if names else f"waiting: {counts}"


# --------------------------------------------------------------------------- registry


# --------------------------------------------------------------------------- status report


def status_report(cfg: DictConfig, status: TriggerStatus, retrain: dict) -> dict:
    """``detloop pool status --json``: the trigger status plus the retrain check (``retrain_status``)."""
    return {**status.to_dict(), "retrain": retrain}


def format_status(cfg: DictConfig, status: TriggerStatus, retrain: dict) -> str:
    """``detloop pool status`` for the terminal."""
    splits = ", ".join(f"{name} {n}" for name, n in status.split_counts.items())
    last = status.last_finetune
    since = (
        f"since fine-tune v{last['version']} ({last['created']}, pool {last['pool_size']})"
        if last
        else "no fine-tune yet"
    )
    lines = [
        f"pool: {status.pool_size} verified samples ({splits}) in {resolve_path(cfg, 'pool')}",
        f"new: {status.new_samples} ({since})",
        "triggers:",
        *(f"  [{'x' if _fired(status, reason) else ' '}] {reason}" for reason in status.reasons),
        retrain["message"],
        status.message,
    ]
    return "\n".join(lines)


def _fired(status: TriggerStatus, reason: str) -> bool:
    return status.triggers.get(reason.split(":", 1)[0], False)
