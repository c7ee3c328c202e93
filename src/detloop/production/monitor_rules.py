"""The monitor's pure rules: the window, the alerts over measured figures (detection rate, confidence,
reports, latency), the configuration check and the terminal report; no I/O, no MLflow."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime

from omegaconf import DictConfig

from detloop.core.errors import BadInput

DAY = 86400.0
WEEK = 7 * DAY
ALERT_KINDS = ("detection_rate", "confidence", "reports", "latency")


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


def check(cfg: DictConfig, found: dict) -> tuple[list[Alert], list[str]]:
    """The alerts of ``found`` (from :func:`measure`) and the checks skipped for lack of data."""
    m = cfg.monitor
    alerts: list[Alert] = []
    skipped: list[str] = []
    if found["images"] < int(m.min_images):
        skipped.append(f"detection rate: {found['images']} scored images < monitor.min_images={m.min_images}")
    else:
        floor = float(m.detection_rate.alert_below)
        for name, rate in found["detection_rate"].items():
            if rate < floor:
                alerts.append(
                    Alert(
                        "detection_rate",
                        f"detection_rate/{name}",
                        rate,
                        floor,
                        f"{name} detected in {rate:.2%} of {found['images']} images (< {floor:.0%})",
                    )
                )
    alerts += _baseline_checks(cfg, found, skipped)
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


def _baseline_checks(cfg: DictConfig, found: dict, skipped: list[str]) -> list[Alert]:
    """Confidence and latency against the baseline (skipped without enough data on either side)."""
    m, base = cfg.monitor, found["baseline"]
    version = found["version"]
    if version is None:
        skipped.append("confidence, latency: no scored images in the window")
        return []
    if found["version_images"] < int(m.min_images):
        skipped.append(
            f"confidence, latency: {found['version_images']} images of v{version} in the window "
            f"< monitor.min_images={m.min_images}"
        )
        return []
    alerts = []
    enough = base["images"] >= int(m.baseline.min_images)
    for key in ("confidence", "latency_ms"):
        reference, value = base[key], found["version_confidence" if key == "confidence" else "latency_ms"]
        fixed = f"{key}_source" in base
        if reference is None or value is None or not (enough or fixed):
            skipped.append(
                f"{key}: baseline of v{version} has {base['images']} images < "
                f"monitor.baseline.min_images={m.baseline.min_images}"
                if not (enough or fixed)
                else f"{key}: no value in the window or the baseline"
            )
            continue
        if key == "confidence":
            limit = float(m.confidence.max_drop)
            drop = (reference - value) / reference if reference > 0 else 0.0
            if drop > limit:
                alerts.append(
                    Alert(
                        "confidence",
                        "confidence/drop",
                        drop,
                        limit,
                        f"average confidence {value:.3f} is {drop:.1%} below the baseline {reference:.3f} "
                        f"of v{version} (alert above {limit:.0%})",
                    )
                )
        else:
            limit = float(m.latency.max_ratio)
            ratio = value / reference if reference > 0 else float("inf")
            if ratio > limit:
                alerts.append(
                    Alert(
                        "latency",
                        "latency/ratio",
                        ratio,
                        limit,
                        f"latency {value:.1f} ms per image is {ratio:.1f}x the baseline {reference:.1f} ms "
                        f"of v{version} (alert above {limit:g}x)",
                    )
                )
    return alerts


def check_config(cfg: DictConfig) -> None:
    m = cfg.monitor
    problems = [
        f"monitor.trigger.alerts: unknown kind {k!r} (one of {', '.join(ALERT_KINDS)})"
        for k in m.trigger.alerts
        if k not in ALERT_KINDS
    ]
    if not 0.0 <= float(m.latency.quantile) <= 1.0:
        problems.append(f"monitor.latency.quantile={m.latency.quantile}: must be in [0, 1]")
    if int(m.reports.rising_weeks) < 1:
        problems.append(f"monitor.reports.rising_weeks={m.reports.rising_weeks}: must be >= 1")
    if problems:
        raise BadInput("bad monitor configuration (conf/monitor/default.yaml)", problems)


def format_result(result: dict) -> str:
    """The terminal report: window, figures, baseline, alerts."""
    base = result["baseline"]
    lines = [
        f"window {result['window']['since']} .. {result['window']['until']}: {result['images']} scored images, "
        f"{result['refused_requests']} refused requests, {result['reports_received']} reports received"
    ]
    rates = ", ".join(f"{k} {v:.1%}" if v is not None else f"{k} -" for k, v in result["detection_rate"].items())
    lines.append(f"detection rate per class: {rates}")
    lines.append(
        f"average confidence: {_num(result['version_confidence'])} (v{result['version']}) vs baseline "
        f"{_num(base['confidence'])}; latency q{result['latency_quantile']:g}: "
        f"{_num(result['latency_ms'], 1)} ms vs baseline {_num(base['latency_ms'], 1)} ms"
    )
    lines.append(f"baseline: v{base['version']} {base['since']} .. {base['until']} ({base['images']} images)")
    lines.append(f"failure reports per week (oldest first): {' '.join(map(str, result['reports_per_week']))}")
    lines += [f"skipped: {s}" for s in result["skipped"]]
    lines += [f"ALERT [{a['kind']}] {a['message']}" for a in result["alerts"]] or ["no alerts"]
    if result["trigger"]:
        lines.append(f"performance trigger raised: {result['trigger']}")
    if result["mlflow_run_id"]:
        lines.append(f"MLflow run {result['mlflow_run_id']}")
    return "\n".join(lines)


def _num(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
