"""The monitor's pure rules: the window, the alerts over measured figures (detection rate, confidence,
reports, latency), the configuration check and the terminal report; no I/O, no MLflow."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from omegaconf import DictConfig, OmegaConf

from detloop.core.errors import BadInput

DAY = 86400.0
WEEK = 7 * DAY
ALERT_KINDS = ("detection_rate", "confidence", "reports", "latency")
BASELINES = ("own", "previous")  # what confidence and latency compare with (monitor.<rule>.baselines)
PREVIOUS_FROM = ("registry", "log")  # where the previous production version is looked up
PERIODS = ("first", "last")  # which days of the previous version are its baseline
MAX_BINS = 400  # the plot's bins per window at most


@dataclass(frozen=True)
class Window:
    """The monitored period ``[since, until)`` as UTC epoch seconds."""

    since: float
    until: float

    def text(self) -> str:
        return f"{iso(self.since)} .. {iso(self.until)}"


@dataclass(frozen=True)
class Alert:
    """One threshold crossed: its kind, the metric, its value, the threshold and a sentence for people."""

    kind: str
    metric: str
    value: float
    threshold: float
    message: str


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str, option: str) -> float:
    """An ISO date or date-time (naive = UTC) as epoch seconds; BadInput names the option."""
    try:
        moment = datetime.fromisoformat(str(text).strip().replace("Z", "+00:00"))
    except ValueError as err:
        raise BadInput(
            f"{option} {text!r}: not an ISO date or date-time",
            ["e.g. 2025-01-06 or 2025-01-06T13:00:00Z (UTC when no zone is given)"],
        ) from err
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def resolve_window(
    cfg: DictConfig,
    since: str | None = None,
    until: str | None = None,
    window_days: float | None = None,
    now: float | None = None,
) -> Window:
    """The window from ``--since``/``--until``/``--window-days`` (default: the last ``monitor.window_days``)."""
    if since is not None and window_days is not None:
        raise BadInput("give --since or --window-days, not both")
    end = parse_time(until, "--until") if until is not None else (time.time() if now is None else now)
    if since is not None:
        start = parse_time(since, "--since")
    else:
        days = float(window_days if window_days is not None else cfg.monitor.window_days)
        if days <= 0:
            raise BadInput(f"window of {days} days: it must be positive (--window-days or monitor.window_days)")
        start = end - days * DAY
    if start >= end:
        raise BadInput(f"empty window: --since {iso(start)} is not before --until {iso(end)}")
    return Window(start, end)


def reports_per_week(times: list[float], until: float, weeks: int) -> list[int]:
    """Reports in each of the ``weeks`` weeks ending at ``until``, oldest first."""
    counts = [0] * weeks
    for ts in times:
        back = int((until - ts) // WEEK)  # 0 = the last week
        if ts < until and back < weeks:
            counts[weeks - 1 - back] += 1
    return counts


def rising(counts: list[int]) -> bool:
    """True when every week has more reports than the week before."""
    return len(counts) > 1 and all(a < b for a, b in zip(counts, counts[1:], strict=False))


def bins(window: Window, hours: float, most: int = MAX_BINS) -> list[Window]:
    """The window cut into bins of ``hours`` (widened to at most ``most`` bins; the last one may be shorter)."""
    span = window.until - window.since
    width = max(float(hours) * 3600.0, span / most)
    count = max(1, math.ceil(span / width - 1e-9))
    edges = [window.since + i * width for i in range(count)] + [window.until]
    return [Window(a, b) for a, b in zip(edges, edges[1:], strict=False)]


@dataclass(frozen=True)
class Comparison:
    """One figure of the monitored version against one baseline (``own`` or ``previous``)."""

    rule: str  # confidence | latency
    baseline: str  # own | previous
    version: str  # the monitored version
    baseline_version: str | None  # the version the baseline was measured on (None for a fixed value)
    value: float  # the monitored version's figure in the window
    reference: float  # the baseline's figure
    figure: float  # confidence: relative drop; latency: ratio
    limit: float  # confidence.max_drop or latency.max_ratio
    alert: bool
    message: str

    @property
    def metric(self) -> str:
        return f"{'confidence/drop' if self.rule == 'confidence' else 'latency/ratio'}/{self.baseline}"


def check(cfg: DictConfig, found: dict) -> tuple[list[Alert], list[str]]:
    """The alerts of ``found`` (from :func:`measure`) and the checks skipped for lack of data."""
    m = cfg.monitor
    skipped: list[str] = []
    alerts = _detection_rate_checks(cfg, found, skipped)
    compared, compare_skipped = compare(cfg, found)
    skipped += compare_skipped
    alerts += [Alert(c.rule, c.metric, c.figure, c.limit, c.message) for c in compared if c.alert]
    weekly = found["reports_per_week"]
    if rising(weekly):
        weeks = int(m.reports.rising_weeks)
        alerts.append(
            Alert(
                "reports",
                "reports/last_week",
                float(weekly[-1]),
                float(weekly[-2]),
                f"failure reports per week rose {weeks} weeks in a row: {' -> '.join(map(str, weekly))}",
            )
        )
    return alerts, skipped


def _detection_rate_checks(cfg: DictConfig, found: dict, skipped: list[str]) -> list[Alert]:
    """Per field, over the images expected to show it (skipped below monitor.min_images of them)."""
    m = cfg.monitor
    least = int(m.min_images)
    if found["images"] < least:
        skipped.append(f"detection rate: {found['images']} scored images < monitor.min_images={least}")
        return []
    floor = float(m.detection_rate.alert_below)
    alerts = []
    for name, rate in found["detection_rate"].items():
        expected = found["expected_images"][name]
        if expected < least:
            skipped.append(
                f"detection rate of {name}: {expected} images expected to show it < monitor.min_images={least}"
            )
        elif rate < floor:
            message = f"{name} detected in {rate:.2%} of {expected} images expected to show it (< {floor:.0%})"
            alerts.append(Alert("detection_rate", f"detection_rate/{name}", rate, floor, message))
    return alerts


def compare(cfg: DictConfig, found: dict) -> tuple[list[Comparison], list[str]]:
    """Confidence and latency of the monitored version against each configured baseline, and what was skipped."""
    m = cfg.monitor
    version = found["version"]
    if version is None:
        return [], ["confidence, latency: no scored images in the window"]
    if found["version_images"] < int(m.min_images):
        return [], [
            f"confidence, latency: {found['version_images']} images of v{version} in the window "
            f"< monitor.min_images={m.min_images}"
        ]
    compared, skipped = [], []
    for rule, key, value in (
        ("confidence", "confidence", found["version_confidence"]),
        ("latency", "latency_ms", found["latency_ms"]),
    ):
        for kind in m[rule].baselines:
            base = found["baselines"][kind]
            why = _unusable(cfg, base, key, value)
            if why:
                skipped.append(f"{rule} vs the {BASELINE_NAMES[kind]}: {why}")
            else:
                compared.append(_comparison(cfg, rule, kind, version, base, value))
    return compared, skipped


BASELINE_NAMES = {"own": "own baseline", "previous": "previous production version's baseline"}


def _unusable(cfg: DictConfig, base: dict, key: str, value: float | None) -> str:
    """Why a baseline cannot be compared with ('' when it can)."""
    if value is None:
        return "no value in the window"
    if _fixed(base, key):
        return ""
    if base["version"] is None:
        return base.get("missing") or "no baseline version"
    least = int(cfg.monitor.baseline.min_images)
    if base["images"] < least:
        return f"v{base['version']}'s baseline period has {base['images']} images < monitor.baseline.min_images={least}"
    if base[key] is None:
        return f"v{base['version']}'s baseline period has no {key}"
    return ""


def _fixed(base: dict, key: str) -> bool:
    """True when the baseline's ``key`` is a configured value (``monitor.baseline.<key>``), not the log's."""
    return base.get(f"{key}_source", "log") != "log"


def _against(kind: str, base: dict, key: str, reference: float) -> str:
    """'its own baseline 0.900 (2025-12-04 .. 2025-12-11, 280 images)' and the like, for the alert message."""
    shown = f"{reference:.3f}" if key == "confidence" else f"{reference:.1f} ms"
    if _fixed(base, key):
        return f"its fixed baseline {shown} ({base[f'{key}_source']})"
    whose = "its own" if kind == "own" else f"the previous production version v{base['version']}'s"
    return f"{whose} baseline {shown} ({base['since'][:10]} .. {base['until'][:10]}, {base['images']} images)"


def _comparison(cfg: DictConfig, rule: str, kind: str, version: str, base: dict, value: float) -> Comparison:
    m = cfg.monitor
    key = "confidence" if rule == "confidence" else "latency_ms"
    reference = float(base[key])
    against = _against(kind, base, key, reference)
    if rule == "confidence":
        limit = float(m.confidence.max_drop)
        figure = (reference - value) / reference if reference > 0 else 0.0
        message = (
            f"average confidence {value:.3f} of v{version} is {figure:.1%} below {against} (alert above {limit:.0%})"
        )
    else:
        limit = float(m.latency.max_ratio)
        figure = value / reference if reference > 0 else float("inf")
        message = f"latency {value:.1f} ms per image of v{version} is {figure:.2f}x {against} (alert above {limit:g}x)"
    measured_on = None if _fixed(base, key) else base["version"]
    return Comparison(rule, kind, version, measured_on, value, reference, figure, limit, figure > limit, message)


def check_config(cfg: DictConfig) -> None:
    """Every monitor key a run reads, checked before it reads the log; BadInput names each bad key."""
    m = cfg.monitor
    problems = [
        f"monitor.trigger.alerts: unknown kind {k!r} (one of {', '.join(ALERT_KINDS)})"
        for k in m.trigger.alerts
        if k not in ALERT_KINDS
    ]
    for rule in ("confidence", "latency"):
        listed = m[rule].baselines
        if not OmegaConf.is_list(listed) or any(k not in BASELINES for k in listed):
            problems.append(f"monitor.{rule}.baselines={listed}: a list of {', '.join(BASELINES)}")
    previous = m.baseline.previous
    if not OmegaConf.is_list(previous.find) or any(k not in PREVIOUS_FROM for k in previous.find):
        problems.append(f"monitor.baseline.previous.find={previous.find}: a list of {', '.join(PREVIOUS_FROM)}")
    if previous.period not in PERIODS:
        problems.append(f"monitor.baseline.previous.period={previous.period}: one of {', '.join(PERIODS)}")
    for key, low, high in (
        ("latency.quantile", 0.0, 1.0),
        ("detection_rate.alert_below", 0.0, 1.0),
        ("confidence.max_drop", 0.0, 1.0),
        ("latency.max_ratio", 0.0, None),
        ("baseline.days", 0.0, None),
        ("mlflow.plot_bin_hours", 0.0, None),
    ):
        value = _number(OmegaConf.select(m, key))
        if value is None or value < low or (high is not None and value > high) or (high is None and value <= low):
            where = f"in [{low:g}, {high:g}]" if high is not None else f"a number > {low:g}"
            problems.append(f"monitor.{key}={OmegaConf.select(m, key)}: must be {where}")
    if int(m.reports.rising_weeks) < 1:
        problems.append(f"monitor.reports.rising_weeks={m.reports.rising_weeks}: must be >= 1")
    if problems:
        raise BadInput("bad monitor configuration (conf/monitor/default.yaml)", problems)


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def format_result(result: dict) -> str:
    """The terminal report: window, figures, both baselines and each comparison, alerts."""
    lines = [
        f"window {result['window']['since']} .. {result['window']['until']}: {result['images']} scored images, "
        f"{result['refused_requests']} refused requests, {result['reports_received']} reports received"
    ]
    rates = ", ".join(
        f"{k} {v:.1%} of {result['expected_images'][k]}" if v is not None else f"{k} - (no image expected it)"
        for k, v in result["detection_rate"].items()
    )
    lines.append(f"detection rate per field (of the images expected to show it): {rates}")
    sources = result["expectation_sources"]
    unlisted = ", ".join(result["unlisted_fields"]) or "nothing"
    lines.append(
        f"expected fields from: expected-fields file {sources['file']}, labelled sets {sources['labelled']}, "
        f"neither {sources['unlisted']} images (these expect {unlisted})"
    )
    latency = _num(result["latency_ms"], 1)
    lines.append(
        f"monitored v{result['version']} ({result['version_images']} images): average confidence "
        f"{_num(result['version_confidence'])}, latency q{result['latency_quantile']:g} {latency} ms"
    )
    for kind, base in result["baselines"].items():
        lines.append(f"  {BASELINE_NAMES[kind]}: {_baseline_text(base)}")
    for c in result["comparisons"]:
        mark = "ALERT" if c["alert"] else "ok"
        figure = (
            f"drop {c['figure']:.1%} (alert above {c['limit']:.0%})"
            if c["rule"] == "confidence"
            else (f"{c['figure']:.2f}x (alert above {c['limit']:g}x)")
        )
        lines.append(f"  {c['rule']} vs {c['baseline']}: {figure} {mark}")
    lines.append(f"failure reports per week (oldest first): {' '.join(map(str, result['reports_per_week']))}")
    lines += [f"skipped: {s}" for s in result["skipped"]]
    lines += [f"ALERT [{a['kind']}] {a['message']}" for a in result["alerts"]] or ["no alerts"]
    if result["trigger"]:
        lines.append(f"performance trigger raised: {result['trigger']}")
    if result["mlflow_run_id"]:
        lines.append(f"MLflow run {result['mlflow_run_id']}")
    return "\n".join(lines)


def _baseline_text(base: dict) -> str:
    if base["version"] is None:
        text = base.get("missing") or "none"
    else:
        text = (
            f"v{base['version']} ({base['found_by']}), {base['period']} {base['since']} .. {base['until']}: "
            f"{base['images']} images, confidence {_num(base['confidence'])}, latency {_num(base['latency_ms'], 1)} ms"
        )
    fixed = [
        f"{key} {base[key]} ({base[f'{key}_source']})"
        for key in ("confidence", "latency_ms")
        if base.get(f"{key}_source", "log") != "log"
    ]
    return text + (f"; fixed: {', '.join(fixed)}" if fixed else "")


def _num(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
