"""``detloop monitor``: the figures measured from the prediction log and the failure-report manifests,
logged to MLflow, and the performance trigger flag; the alert rules are in :mod:`detloop.production.monitor_rules`."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import sqlalchemy as sa
from omegaconf import DictConfig, OmegaConf

from detloop.core.config import resolve_path
from detloop.core.errors import BadInput
from detloop.data.manifest import MANIFEST, read_manifest
from detloop.production import predlog
from detloop.production.monitor_rules import (
    DAY,
    WEEK,
    Alert,
    Window,
    check,
    check_config,
    iso,
    parse_time,
    reports_per_week,
)

log = logging.getLogger(__name__)


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
    check_config(cfg)
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
