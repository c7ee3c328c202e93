"""``detloop monitor``: the figures measured from the prediction log and the failure-report manifests,
their baselines (the monitored version's own and the previous production version's), logged to MLflow
with a plot over time, and the performance trigger flag; the alert rules are in
:mod:`detloop.production.monitor_rules`, the fields each image is expected to show in
:mod:`detloop.production.expected_fields`, the plot in :mod:`detloop.production.monitor_plot`."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import sqlalchemy as sa
from omegaconf import DictConfig, OmegaConf

from detloop.core.config import resolve_path
from detloop.core.errors import BadInput
from detloop.data.manifest import MANIFEST, read_manifest
from detloop.production import expected_fields, predlog
from detloop.production.monitor_rules import (
    DAY,
    WEEK,
    Alert,
    Comparison,
    Window,
    bins,
    check,
    check_config,
    compare,
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


def image_stats(conn, cond) -> dict:
    """Images, detections and average confidence of the rows matching ``cond``."""
    c = predlog.predictions.c
    columns = [
        sa.func.count(),
        sa.func.coalesce(sa.func.sum(c.n_detections), 0),
        sa.func.coalesce(sa.func.sum(c.confidence_sum), 0.0),
    ]
    images, detections, confidence_sum = conn.execute(sa.select(*columns).where(cond)).one()
    return {
        "images": int(images),
        "detections": int(detections),
        "confidence": float(confidence_sum) / detections if detections else None,
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


def first_served(conn, version: str) -> float | None:
    """When ``version`` answered its first scored request (epoch seconds), or None."""
    c = predlog.predictions.c
    return conn.execute(sa.select(sa.func.min(c.ts)).where(scored(version=version))).scalar_one_or_none()


def last_served(conn, version: str, before: float) -> float | None:
    """When ``version`` answered its last scored request before ``before``, or None."""
    c = predlog.predictions.c
    query = sa.select(sa.func.max(c.ts)).where(scored(version=version), c.ts < before)
    return conn.execute(query).scalar_one_or_none()


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


def expected_classes(cfg: DictConfig, names: dict[int, str] | None, problems: list[str]) -> list[str]:
    """``monitor.expected_classes`` (the monitored fields), or every class of the anchor data.yaml."""
    listed = cfg.monitor.expected_classes
    if listed is not None:
        fields = [str(n) for n in listed]
        if not fields or any("|" in n for n in fields):
            raise BadInput("monitor.expected_classes: give class names (without '|'), or null for every anchor class")
        return fields
    if names is None:
        raise BadInput(
            "monitor.expected_classes is null and the anchor data.yaml is unusable; list the classes "
            "in monitor.expected_classes",
            problems,
        )
    return [names[i] for i in sorted(names)]


# --------------------------------------------------------------------------- detection rate per field


@dataclass
class FieldCounts:
    """Scored images, and per field the images expected to show it and those it was detected in."""

    images: int = 0
    expected: Counter = field(default_factory=Counter)
    detected: Counter = field(default_factory=Counter)
    sources: Counter = field(default_factory=Counter)  # images by the source of their expectation

    def __add__(self, other: FieldCounts) -> FieldCounts:
        return FieldCounts(
            self.images + other.images,
            self.expected + other.expected,
            self.detected + other.detected,
            self.sources + other.sources,
        )

    def rates(self, fields: list[str]) -> dict[str, float | None]:
        return {n: self.detected[n] / self.expected[n] if self.expected[n] else None for n in fields}


def field_counts(conn, cond, expect: expected_fields.Expectations) -> FieldCounts:
    """Per-field counts over the rows matching ``cond``, each image counted for the fields it is expected to show."""
    c = predlog.predictions.c
    out = FieldCounts()
    if not expect.per_image:  # every image expects the same fields: all in SQL
        fields = [n for n in expect.monitored if n in expect.unlisted]
        found = [sa.func.coalesce(sa.func.sum(sa.case((predlog.detected(n), 1), else_=0)), 0) for n in fields]
        images, *hits = conn.execute(sa.select(sa.func.count(), *found).where(cond)).one()
        out.images = int(images)
        out.sources["unlisted"] = int(images)
        for name, n in zip(fields, hits, strict=True):
            out.expected[name], out.detected[name] = int(images), int(n)
        return out
    query = sa.select(c.image_sha256, c.classes, sa.func.count()).where(cond).group_by(c.image_sha256, c.classes)
    for sha, classes, n in conn.execute(query):
        fields, source = expect.of(sha)
        shown = set(classes.strip("|").split("|")) if classes else set()
        out.images += n
        out.sources[source] += n
        for name in fields:
            out.expected[name] += n
            out.detected[name] += n if name in shown else 0
    return out


# --------------------------------------------------------------------------- baselines


def previous_version(cfg: DictConfig, conn, version: str, window: Window) -> tuple[str | None, str, str]:
    """The previous production version of ``version``: ``(version, how it was found, why none was found)``."""
    node = cfg.monitor.baseline.previous
    if node.version is not None:
        return str(node.version), "monitor.baseline.previous.version", ""
    tried = []
    for source in node.find:
        found, note = (
            _previous_in_registry(cfg, version, window.until)
            if source == "registry"
            else _previous_in_log(conn, version)
        )
        if found is not None and found != version and first_served(conn, found) is None:
            found, note = None, f"{source}: v{found} never answered (no log rows to compare with)"
        if found is not None and found != version:
            return found, note, ""
        tried.append(note)
    return None, "", "; ".join(tried) or "monitor.baseline.previous.find is empty"


def _previous_in_registry(cfg: DictConfig, version: str, until: float) -> tuple[str | None, str]:
    """The ``from_version`` of the audit trail's last move of ``serve.alias`` to ``version`` before ``until``."""
    from detloop.tracking import oversight, registry, runs, store

    alias = str(cfg.serve.alias)
    db = predlog.sqlite_path(store.tracking_uri(cfg))
    if db is not None and not db.is_file():
        return None, f"registry: no tracking store at {db}"
    runs.setup(cfg)
    oversight.watch(cfg, (alias,), seen_by="monitor")  # a move made in the MLflow UI is in the trail first
    moves = [
        move
        for move in registry.history(cfg)
        if move["alias"] == alias
        and move["state"] == "done"
        and not move.get("refused")
        and move["to_version"] == version
        and (not move.get("time") or parse_time(move["time"], "audit.time") < until)
    ]
    if not moves:
        return None, f"registry: no recorded move of '{alias}' to v{version} before {iso(until)}"
    previous = moves[-1]["from_version"] or None
    if previous is None:
        return None, f"registry: v{version} was the first holder of '{alias}'"
    return previous, f"registry audit trail: '{alias}' moved from v{previous} to v{version} on {moves[-1]['time']}"


def _previous_in_log(conn, version: str) -> tuple[str | None, str]:
    """The version that answered last before ``version`` first answered."""
    c = predlog.predictions.c
    start = first_served(conn, version)
    if start is None:
        return None, f"log: v{version} never answered"
    query = (
        sa.select(c.model_version)
        .where(scored(), c.ts < start, c.model_version != version)
        .order_by(c.ts.desc(), c.id.desc())
        .limit(1)
    )
    found = conn.execute(query).scalar_one_or_none()
    if found is None:
        return None, f"log: nothing answered before v{version} first did at {iso(start)}"
    return str(found), f"prediction log: v{found} answered before v{version} first did at {iso(start)}"


def baseline_of(conn, cfg: DictConfig, version: str, period: str, until: float) -> dict:
    """A version's baseline period (``first`` N days it served, or its ``last`` N days before ``until``)."""
    days = float(cfg.monitor.baseline.days) * DAY
    out = {"version": version, "period": f"{period} {cfg.monitor.baseline.days:g} days it served", "images": 0}
    out.update(since=None, until=None, confidence=None, latency_ms=None)
    if period == "first":
        start = first_served(conn, version)
        span = None if start is None else Window(start, start + days)
    else:
        end = last_served(conn, version, until)
        span = None if end is None else Window(end - days, math.nextafter(end, math.inf))
    if span is None:
        out["missing"] = f"v{version} has no scored images in the prediction log"
        return out
    stats = image_stats(conn, scored(span, version))
    out.update(
        since=iso(span.since),
        until=iso(span.until),
        images=stats["images"],
        confidence=stats["confidence"],
        latency_ms=latency_quantile(conn, scored(span, version), float(cfg.monitor.latency.quantile)),
    )
    return out


def baselines(cfg: DictConfig, conn, version: str | None, window: Window) -> dict[str, dict]:
    """The own and the previous production version's baseline (fixed values from monitor.baseline on own)."""
    m = cfg.monitor
    empty = {"version": None, "images": 0, "confidence": None, "latency_ms": None, "since": None, "until": None}
    own = {**empty, "missing": "no scored images in the window"}
    previous = {**empty, "missing": "no scored images in the window"}
    if version is not None:
        own = {**baseline_of(conn, cfg, version, "first", window.until), "found_by": "the monitored version"}
        if "previous" in set(m.confidence.baselines) | set(m.latency.baselines):
            found, how, why = previous_version(cfg, conn, version, window)
            previous = {**empty, "missing": f"no previous production version ({why})"}
            if found is not None:
                previous = {**baseline_of(conn, cfg, found, str(m.baseline.previous.period), window.until)}
                previous["found_by"] = how
        else:
            previous["missing"] = "not compared (monitor.confidence.baselines, monitor.latency.baselines)"
    for key in ("confidence", "latency_ms"):
        own[f"{key}_source"] = "log"
        previous[f"{key}_source"] = "log"
        if m.baseline[key] is not None:
            own[key] = float(m.baseline[key])
            own[f"{key}_source"] = f"monitor.baseline.{key}"
    return {"own": own, "previous": previous}


# --------------------------------------------------------------------------- the window, over time


def series(
    conn, cfg: DictConfig, window: Window, cuts: list[Window], expect: expected_fields.Expectations
) -> tuple[dict, FieldCounts, dict]:
    """The figures per bin (``cuts`` of the window); the per-field counts and the per-version figures of the
    whole window."""
    q = float(cfg.monitor.latency.quantile)
    counts = [field_counts(conn, scored(cut), expect) for cut in cuts]
    per_version = version_series(conn, window, cuts)
    fields = list(expect.monitored)
    out = {
        "since": [iso(cut.since) for cut in cuts],
        "hours": (cuts[0].until - cuts[0].since) / 3600.0 if cuts else 0.0,
        "images": [n.images for n in counts],
        "detection_rate": {name: [n.rates(fields)[name] for n in counts] for name in fields},
        "expected_images": {name: [n.expected[name] for n in counts] for name in fields},
        "confidence": {v: figures.confidence for v, figures in per_version.items()},
        "latency_ms": {v: figures.latency_ms(q) for v, figures in per_version.items()},
    }
    return out, sum(counts, FieldCounts()), per_version


@dataclass
class VersionFigures:
    """One version's answers in the window: per bin and in total (confidence = detection-weighted average)."""

    images: list[int]
    detections: list[int]
    confidence_sum: list[float]
    latencies: list[list[float]]
    last: float = 0.0  # when it answered last in the window

    @property
    def confidence(self) -> list[float | None]:
        return [s / n if n else None for n, s in zip(self.detections, self.confidence_sum, strict=True)]

    def latency_ms(self, q: float) -> list[float | None]:
        return [_nearest_rank(sorted(values), q) for values in self.latencies]

    def total(self, q: float) -> dict:
        n = sum(self.detections)
        return {
            "images": sum(self.images),
            "detections": n,
            "confidence": sum(self.confidence_sum) / n if n else None,
            "latency_ms": _nearest_rank(sorted(x for values in self.latencies for x in values), q),
        }


def version_series(conn, window: Window, cuts: list[Window]) -> dict[str, VersionFigures]:
    """Per version that answered in the window (in the order of its first answer), its figures per bin, from
    one read of the window's scored rows (latency quantiles by nearest rank, as :func:`latency_quantile`).

    ``cuts`` are :func:`bins` of the window: equal widths from its start, the last one maybe shorter."""
    c = predlog.predictions.c
    columns = (c.ts, c.model_version, c.n_detections, c.confidence_sum, c.latency_ms)
    query = sa.select(*columns).where(scored(window)).order_by(c.ts, c.id)
    width, last = (cuts[0].until - cuts[0].since, len(cuts) - 1) if cuts else (1.0, 0)
    found: dict[str, VersionFigures] = {}
    for ts, version, detections, confidence_sum, latency in conn.execute(query):
        figures = found.get(version)
        if figures is None:
            if version is None:
                continue
            figures = found[version] = VersionFigures(
                [0] * len(cuts), [0] * len(cuts), [0.0] * len(cuts), [[] for _ in cuts]
            )
        k = min(int((ts - window.since) // width), last)
        figures.images[k] += 1
        figures.detections[k] += detections
        figures.confidence_sum[k] += confidence_sum
        figures.last = ts
        if latency is not None:
            figures.latencies[k].append(latency)
    return found


def _nearest_rank(values: list[float], q: float) -> float | None:
    return values[min(int(q * (len(values) - 1) + 0.5), len(values) - 1)] if values else None


def measure(cfg: DictConfig, log_store: predlog.PredictionLog, window: Window) -> dict:
    """Every monitored figure for the window, with its baselines and its series over time (no decisions)."""
    m = cfg.monitor
    names, problems = expected_fields.anchor_names(cfg)
    classes = expected_classes(cfg, names, problems)
    expect = expected_fields.load(cfg, classes, names)
    cuts = bins(window, float(m.mlflow.plot_bin_hours))
    q = float(m.latency.quantile)
    with log_store.engine.connect() as conn:
        over_time, total, per_version = series(conn, cfg, window, cuts, expect)
        answered_last = max(per_version, key=lambda v: per_version[v].last) if per_version else None
        version = str(m.baseline.version) if m.baseline.version is not None else answered_last
        totals = {v: figures.total(q) for v, figures in per_version.items()}
        current = totals.get(version, {"images": 0, "confidence": None, "latency_ms": None})
        compared_with = baselines(cfg, conn, version, window)
        counts = request_counts(conn, window)
    times = report_times(cfg)
    over_time["reports"] = [sum(1 for t in times if cut.since <= t < cut.until) for cut in cuts]
    return {
        "window": {"since": iso(window.since), "until": iso(window.until)},
        "latency_quantile": q,
        "expected_classes": classes,
        "images": total.images,
        "detections": sum(t["detections"] for t in totals.values()),
        "confidence": _average(list(totals.values())),
        "detection_rate": total.rates(classes),
        "expected_images": {n: total.expected[n] for n in classes},
        "detected_images": {n: total.detected[n] for n in classes},
        "expectation_sources": {s: total.sources[s] for s in expected_fields.SOURCES},
        "unlisted_fields": sorted(expect.unlisted),
        "version": version,
        "version_images": current["images"],
        "version_confidence": current["confidence"],
        "latency_ms": current["latency_ms"],
        "baselines": compared_with,
        "reports_per_week": reports_per_week(times, window.until, int(m.reports.rising_weeks) + 1),
        "series": over_time,
        **counts,
    }


def _average(totals: list[dict]) -> float | None:
    """The detection-weighted average confidence over several versions' totals."""
    n = sum(t["detections"] for t in totals)
    return sum(t["confidence"] * t["detections"] for t in totals if t["detections"]) / n if n else None


def metrics_of(found: dict, comparisons: list[Comparison]) -> dict[str, float]:
    """The figures as flat MLflow metric names (missing and non-finite values left out)."""
    from detloop.tracking.runs import metric_name

    values = {
        "images": found["images"],
        "detections": found["detections"],
        "confidence": found["confidence"],
        "version_images": found["version_images"],
        "confidence/version": found["version_confidence"],
        "latency_ms": found["latency_ms"],
        "reports/last_week": found["reports_per_week"][-1],
        "requests/refused": found["refused_requests"],
        "reports/received": found["reports_received"],
        **{f"detection_rate/{name}": rate for name, rate in found["detection_rate"].items()},
        **{f"expected_images/{name}": n for name, n in found["expected_images"].items()},
    }
    for kind, base in found["baselines"].items():
        values[f"confidence/baseline/{kind}"] = base["confidence"]
        values[f"latency_ms/baseline/{kind}"] = base["latency_ms"]
        values[f"baseline/{kind}/images"] = base["images"]
    values.update({c.metric: c.figure for c in comparisons})
    return {metric_name(k): float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}


def log_to_mlflow(cfg: DictConfig, result: dict, window: Window) -> str:
    """One run in ``monitor.mlflow.experiment``: metrics at the window's end, alerts as tags, monitor.json and
    monitor.png (the figures across the window with the alert thresholds)."""
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
        RunTag("monitor.previous_version", str(result["baselines"]["previous"]["version"])),
        RunTag("monitor.alerts", "; ".join(a["message"] for a in alerts)[:5000] or "none"),
    ]
    client.log_batch(run.info.run_id, metrics=metrics, params=params, tags=tags)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "monitor.json"
        path.write_text(json.dumps(result, indent=2, sort_keys=True, default=str))
        client.log_artifact(run.info.run_id, str(path))
        _log_plot(cfg, client, run.info.run_id, result, Path(tmp) / "monitor.png")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _log_plot(cfg: DictConfig, client, run_id: str, result: dict, path: Path) -> None:
    """monitor.png into the run; a plot that fails is a warning and a run tag, never a lost alert."""
    from detloop.production.monitor_plot import draw

    try:
        draw(cfg, result, path)
    except Exception as err:  # noqa: BLE001  (the alerts above are logged already; the picture is extra)
        log.warning("monitor.png not drawn: %s", err, exc_info=True)
        client.set_tag(run_id, "monitor.plot", f"failed: {err}"[:5000])
        return
    client.log_artifact(run_id, str(path))


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

    Returns ``{window, detection_rate, baselines, comparisons, series, metrics, alerts, skipped, trigger,
    mlflow_run_id, ...}`` (JSON-ready).
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
    comparisons, _ = compare(cfg, found)
    result = {
        **found,
        "comparisons": [{**asdict(c), "metric": c.metric} for c in comparisons],
        "alerts": [asdict(a) for a in alerts],
        "skipped": skipped,
        "metrics": metrics_of(found, comparisons),
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
