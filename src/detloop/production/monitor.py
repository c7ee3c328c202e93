"""``detloop monitor``: production metrics over a window of the prediction log (document section 7).

Over the scored images (``endpoint=invocations``, ``status=200``) with ``since <= ts < until``:

* **detection rate per class**: the share of images in which each expected class
  (``monitor.expected_classes``; default every anchor class) was detected at least once. Alert when
  one is below ``monitor.detection_rate.alert_below`` (90 %).
* **average confidence** of every detection, compared with the baseline: alert on a drop of more
  than ``monitor.confidence.max_drop`` (5 %) of the baseline value.
* **failure reports per week**: reports in the inbox, pool and rejected manifests (one per id, by
  ``reported_at``) in each of the ``rising_weeks + 1`` weeks ending at ``until``; alert when the
  count rose ``monitor.reports.rising_weeks`` (3) weeks in a row.
* **latency**: the per-image serving latency at ``monitor.latency.quantile`` (median), compared with
  the baseline's: alert above ``monitor.latency.max_ratio`` (2x).

The baseline compares like with like. Its version is ``monitor.baseline.version``, by default the
version that answered last in the window; its period is the first ``monitor.baseline.days`` (7) days
that version served (from its first row in the log), so every promotion starts a new baseline. The
window's confidence and latency are taken over that version's rows only. A baseline period with fewer
than ``baseline.min_images`` images is not compared against (the check is listed as skipped), and
``baseline.confidence`` / ``baseline.latency_ms`` replace the log's values with fixed ones.

A run logs its metrics, alerts and ``monitor.json`` to the MLflow experiment ``monitor.mlflow.experiment``
(timestamped at the window's end, so the UI's charts show the trend), and, with ``--raise-trigger`` or
``monitor.trigger.raise``, an alert of a kind in ``monitor.trigger.alerts`` writes the performance
trigger flag ``trigger.performance_flag`` (JSON with a ``reason``, as :mod:`detloop.data.pool` reads it).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from omegaconf import DictConfig, OmegaConf

from detloop.core.config import resolve_path
from detloop.core.errors import BadInput
from detloop.data.manifest import MANIFEST, read_manifest
from detloop.production import predlog

log = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------- reading the log


def scored(window: Window | None = None, version: str | None = None) -> sa.ColumnElement[bool]:
    """SQL condition: scored images (invocations answered with 200), optionally in a window and of a version."""
    c = predlog.predictions.c
    cond = sa.and_(c.endpoint == "invocations", c.status == 200)
    if window is not None:
        cond = sa.and_(cond, c.ts >= window.since, c.ts < window.until)
    if version is not None:
        cond = sa.and_(cond, c.model_version == version)
    return cond


def image_stats(conn, cond, classes: list[str]) -> dict:
    """Images, detections, average confidence and per-class detection rate of the rows matching ``cond``."""
    c = predlog.predictions.c
    columns = [
        sa.func.count(),
        sa.func.coalesce(sa.func.sum(c.n_detections), 0),
        sa.func.coalesce(sa.func.sum(c.confidence_sum), 0.0),
    ]
    columns += [sa.func.coalesce(sa.func.sum(sa.case((predlog.detected(name), 1), else_=0)), 0) for name in classes]
    images, detections, confidence_sum, *found = conn.execute(sa.select(*columns).where(cond)).one()
    return {
        "images": int(images),
        "detections": int(detections),
        "confidence": float(confidence_sum) / detections if detections else None,
        "detection_rate": {name: int(n) / images if images else None for name, n in zip(classes, found, strict=True)},
    }


def latency_quantile(conn, cond, q: float) -> float | None:
    """The ``q`` quantile of ``latency_ms`` over the rows matching ``cond`` (nearest rank), or None."""
    c = predlog.predictions.c
    n = conn.execute(sa.select(sa.func.count()).where(cond, c.latency_ms.is_not(None))).scalar_one()
    if not n:
        return None
    rank = min(int(q * (n - 1) + 0.5), n - 1)
    query = sa.select(c.latency_ms).where(cond, c.latency_ms.is_not(None)).order_by(c.latency_ms)
    return float(conn.execute(query.offset(rank).limit(1)).scalar_one())


def last_version(conn, window: Window) -> str | None:
    """The version that answered last in the window."""
    c = predlog.predictions.c
    query = sa.select(c.model_version).where(scored(window)).order_by(c.ts.desc(), c.id.desc()).limit(1)
    return conn.execute(query).scalar_one_or_none()


def first_served(conn, version: str) -> float | None:
    """When ``version`` answered its first scored request (epoch seconds), or None."""
    c = predlog.predictions.c
    return conn.execute(sa.select(sa.func.min(c.ts)).where(scored(version=version))).scalar_one_or_none()


def request_counts(conn, window: Window) -> dict[str, int]:
    """Refused requests and received reports in the window (every endpoint)."""
    c = predlog.predictions.c
    inside = sa.and_(c.ts >= window.since, c.ts < window.until)
    refused = sa.func.count(sa.distinct(c.request_id)).filter(c.status >= 400)
    reports = sa.func.count().filter(sa.and_(c.endpoint == "report", c.status < 400))
    row = conn.execute(sa.select(refused, reports).where(inside)).one()
    return {"refused_requests": int(row[0]), "reports_received": int(row[1])}


# --------------------------------------------------------------------------- failure reports


def report_times(cfg: DictConfig) -> list[float]:
    """``reported_at`` of every failure report (inbox, pool, rejected; one per id), as epoch seconds."""
    inbox, pool = resolve_path(cfg, "inbox"), resolve_path(cfg, "pool")
    prefixes = tuple(str(s) for s in cfg.monitor.reports.sources or [])
    seen: dict[str, float] = {}
    for path in (inbox / MANIFEST, inbox / "rejected.jsonl", pool / MANIFEST):
        try:
            rows = read_manifest(path)
        except ValueError as err:
            raise BadInput(f"cannot count failure reports: {err}") from err
        for row in rows:
            when = row.get("reported_at")
            if not when or row.get("id") in seen or (prefixes and not str(row.get("source", "")).startswith(prefixes)):
                continue
            seen[row["id"]] = parse_time(when, f"{path}: reported_at of {row['id']}")
    return sorted(seen.values())


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


# --------------------------------------------------------------------------- the checks


def expected_classes(cfg: DictConfig) -> list[str]:
    """``monitor.expected_classes``, or every class of the anchor data.yaml."""
    listed = cfg.monitor.expected_classes
    if listed is not None:
        names = [str(n) for n in listed]
        if not names or any("|" in n for n in names):
            raise BadInput("monitor.expected_classes: give class names (without '|'), or null for every anchor class")
        return names
    from detloop.data.yolo_format import inspect_data_yaml

    spec, problems = inspect_data_yaml(resolve_path(cfg, "anchor") / "data.yaml")
    if spec is None:
        raise BadInput(
            "monitor.expected_classes is null and the anchor data.yaml is unusable; list the classes "
            "in monitor.expected_classes",
            problems,
        )
    return [spec.names[i] for i in sorted(spec.names)]


def measure(cfg: DictConfig, log_store: predlog.PredictionLog, window: Window) -> dict:
    """Every monitored figure for the window, with its baseline (no decisions)."""
    m = cfg.monitor
    classes = expected_classes(cfg)
    q = float(m.latency.quantile)
    with log_store.engine.connect() as conn:
        stats = image_stats(conn, scored(window), classes)
        version = str(m.baseline.version) if m.baseline.version is not None else last_version(conn, window)
        current = {"images": 0, "confidence": None, "latency_ms": None}
        baseline: dict = {
            "version": version,
            "since": None,
            "until": None,
            "images": 0,
            "confidence": None,
            "latency_ms": None,
        }
        if version is not None:
            current = image_stats(conn, scored(window, version), [])
            current["latency_ms"] = latency_quantile(conn, scored(window, version), q)
            start = first_served(conn, version)
            if start is not None:
                period = Window(start, start + float(m.baseline.days) * DAY)
                base = image_stats(conn, scored(period, version), [])
                baseline.update(
                    since=iso(period.since),
                    until=iso(period.until),
                    images=base["images"],
                    confidence=base["confidence"],
                    latency_ms=latency_quantile(conn, scored(period, version), q),
                )
        counts = request_counts(conn, window)
    for key, fixed in (("confidence", m.baseline.confidence), ("latency_ms", m.baseline.latency_ms)):
        if fixed is not None:
            baseline[key] = float(fixed)
            baseline[f"{key}_source"] = f"monitor.baseline.{key}"
    weeks = int(m.reports.rising_weeks) + 1
    return {
        "window": {"since": iso(window.since), "until": iso(window.until)},
        "latency_quantile": q,
        "expected_classes": classes,
        "images": stats["images"],
        "detections": stats["detections"],
        "confidence": stats["confidence"],
        "detection_rate": stats["detection_rate"],
        "version": version,
        "version_images": current["images"],
        "version_confidence": current["confidence"],
        "latency_ms": current["latency_ms"],
        "baseline": baseline,
        "reports_per_week": reports_per_week(report_times(cfg), window.until, weeks),
        **counts,
    }


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


# --------------------------------------------------------------------------- side effects


def metrics_of(found: dict) -> dict[str, float]:
    """The figures as flat MLflow metric names (missing values left out)."""
    from detloop.tracking.runs import metric_name

    base = found["baseline"]
    values = {
        "images": found["images"],
        "detections": found["detections"],
        "confidence": found["confidence"],
        "version_images": found["version_images"],
        "confidence/version": found["version_confidence"],
        "confidence/baseline": base["confidence"],
        "latency_ms": found["latency_ms"],
        "latency_ms/baseline": base["latency_ms"],
        "baseline/images": base["images"],
        "reports/last_week": found["reports_per_week"][-1],
        "requests/refused": found["refused_requests"],
        "reports/received": found["reports_received"],
        **{f"detection_rate/{name}": rate for name, rate in found["detection_rate"].items()},
    }
    if base["confidence"] and found["version_confidence"] is not None:
        values["confidence/drop"] = (base["confidence"] - found["version_confidence"]) / base["confidence"]
    if base["latency_ms"] and found["latency_ms"] is not None:
        values["latency/ratio"] = found["latency_ms"] / base["latency_ms"]
    return {metric_name(k): float(v) for k, v in values.items() if v is not None}


def log_to_mlflow(cfg: DictConfig, result: dict, window: Window) -> str:
    """One run in ``monitor.mlflow.experiment``: metrics at the window's end, alerts as tags, monitor.json."""
    import mlflow
    from mlflow.entities import Metric, Param, RunTag

    from detloop.tracking import runs

    experiment_id = runs.setup(cfg, experiment=str(cfg.monitor.mlflow.experiment))
    client = mlflow.MlflowClient()
    run = client.create_run(experiment_id, run_name=f"monitor {iso(window.until)}")
    stamp = int(window.until * 1000)
    metrics = [Metric(k, v, stamp, 0) for k, v in result["metrics"].items()]
    for index, count in enumerate(result["reports_per_week"]):  # the weekly series, one point per week end
        week_end = window.until - (len(result["reports_per_week"]) - 1 - index) * WEEK
        metrics.append(Metric("reports/per_week", float(count), int(week_end * 1000), index))
    params = [Param(k, str(v)[:6000]) for k, v in _flat(OmegaConf.to_container(cfg.monitor, resolve=True)).items()]
    alerts = result["alerts"]
    tags = [
        RunTag("stage", "monitor"),
        RunTag("monitor.status", "alert" if alerts else "ok"),
        RunTag("monitor.since", result["window"]["since"]),
        RunTag("monitor.until", result["window"]["until"]),
        RunTag("monitor.version", str(result["version"])),
        RunTag("monitor.alerts", "; ".join(a["message"] for a in alerts)[:5000] or "none"),
    ]
    client.log_batch(run.info.run_id, metrics=metrics, params=params, tags=tags)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "monitor.json"
        path.write_text(json.dumps(result, indent=2, sort_keys=True, default=str))
        client.log_artifact(run.info.run_id, str(path))
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _flat(node: dict, prefix: str = "monitor.") -> dict:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def flag_path(cfg: DictConfig) -> Path:
    """``trigger.performance_flag`` as :mod:`detloop.data.pool` resolves it."""
    from detloop.data.pool import performance_flag_path

    return performance_flag_path(cfg)


def raise_trigger(cfg: DictConfig, alerts: list[Alert], window: Window) -> Path:
    """Write the performance trigger flag (JSON with ``reason``), atomically; returns its path."""
    path = flag_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "reason": "; ".join(a.message for a in alerts),
        "raised_by": "detloop monitor",
        "raised_at": iso(time.time()),
        "window": {"since": iso(window.since), "until": iso(window.until)},
        "alerts": [asdict(a) for a in alerts],
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)
    log.warning("performance trigger raised: %s", path)
    return path


# --------------------------------------------------------------------------- the command


def run(
    cfg: DictConfig,
    window: Window,
    raise_flag: bool | None = None,
    log_store: predlog.PredictionLog | None = None,
    to_mlflow: bool | None = None,
) -> dict:
    """Measure the window, decide the alerts, log to MLflow and raise the trigger when asked.

    Returns ``{window, metrics, alerts, skipped, trigger, mlflow_run_id, ...}`` (JSON-ready).
    """
    _check_config(cfg)
    owned = log_store is None
    store = predlog.open_log(cfg) if owned else log_store
    started = time.perf_counter()
    try:
        found = measure(cfg, store, window)
    finally:
        if owned:
            store.close()
    alerts, skipped = check(cfg, found)
    result = {
        **found,
        "alerts": [asdict(a) for a in alerts],
        "skipped": skipped,
        "metrics": metrics_of(found),
        "predlog": predlog.shown_uri(store.uri),
        "seconds": time.perf_counter() - started,
        "trigger": None,
        "mlflow_run_id": None,
    }
    kinds = set(cfg.monitor.trigger.alerts)
    raising = [a for a in alerts if a.kind in kinds]
    if (cfg.monitor.trigger["raise"] if raise_flag is None else raise_flag) and raising:
        result["trigger"] = str(raise_trigger(cfg, raising, window))
    if cfg.monitor.mlflow.log if to_mlflow is None else to_mlflow:
        result["mlflow_run_id"] = log_to_mlflow(cfg, result, window)
    return result


def _check_config(cfg: DictConfig) -> None:
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
