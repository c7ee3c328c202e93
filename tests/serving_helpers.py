"""Helpers for the production-side tests: pages, real registered pyfunc detectors, seeded prediction logs."""

from __future__ import annotations

import io
import random
from pathlib import Path

import yaml

HOUR = 3600.0
DAY = 86400.0


def page_bytes(seed: int, size: tuple[int, int] = (96, 120), fmt: str = "JPEG") -> bytes:
    """A small random image (distinct bytes per seed)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.frombytes("RGB", size, random.Random(seed).randbytes(size[0] * size[1] * 3)).save(buffer, fmt)
    return buffer.getvalue()


def anchor_classes(data: Path) -> list[str]:
    """Class names of the anchor data.yaml under ``data``, in id order."""
    names = yaml.safe_load((data / "anchor" / "data.yaml").read_text())["names"]
    return [names[i] for i in sorted(names)] if isinstance(names, dict) else list(names)


def detector_weights(path: Path, names: list[str], hot_class: int) -> Path:
    """An untrained yolov8n for ``names`` whose class ``hot_class`` logit bias is raised, saved as a .pt.

    No download and no training: every image then gets boxes of that class with confidence ~0.98,
    so a test can tell which model answered.
    """
    import torch
    import ultralytics

    from detloop.model.yolo import ultralytics as ul

    arch = yaml.safe_load((Path(ultralytics.__file__).parent / "cfg/models/v8/yolov8.yaml").read_text())
    arch["nc"] = len(names)
    folder = path.parent / f"arch-{path.stem}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "yolov8n.yaml").write_text(yaml.safe_dump(arch))  # the file name selects the n scale
    model = ul().YOLO(str(folder / "yolov8n.yaml"))
    model.model.names = dict(enumerate(names))
    with torch.no_grad():
        for branch in model.model.model[-1].cv3:
            branch[-1].bias[hot_class] = 4.0
    model.save(str(path))
    return path


def register_detector(cfg, weights: Path, *, imgsz: int = 64, conf: float = 0.25, tags: dict | None = None) -> str:
    """Log ``weights`` as the detloop pyfunc in a run and register it (a real MLflow model); returns the version."""
    import mlflow
    from tests.conftest import log_gate_record

    from detloop.model.pyfunc import log_detector
    from detloop.tracking import registry, runs

    tags = {"kind": "base", "decision": "pass", "gate.decision": "pass", **(tags or {})}
    tags = {k: v for k, v in tags.items() if v is not None}  # None: leave the tag (and its record) out
    experiment_id = runs.setup(cfg)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"test-{weights.stem}") as run:
        mlflow.log_param("kind", tags["kind"])  # the training run's record, as the training stages log it
        info = log_detector(
            weights, {"conf": conf, "iou": 0.7, "imgsz": imgsz}, registered_model_name=cfg.mlflow.registered_model
        )
    version = str(info.registered_model_version)
    if "gate.decision" in tags:
        log_gate_record(cfg, version, run.info.run_id, tags)
    registry.set_version_tags(cfg.mlflow.registered_model, version, tags)
    return version


# --------------------------------------------------------------------------- seeded prediction logs


def seed_log(
    store,
    start: float,
    days: float,
    per_day: int,
    *,
    version: str = "1",
    classes=("title", "date"),
    missing: dict | None = None,
    confidence: float = 0.9,
    latency_ms: float = 20.0,
) -> int:
    """Scored images spread evenly over ``days`` from ``start``; returns how many were written.

    Every image detects each of ``classes`` with ``confidence``, except that class ``c`` is missing
    from every ``missing[c]``-th image.
    """
    from detloop.production.predlog import Record, detection_fields, new_request_id

    missing = missing or {}
    total = int(days * per_day)
    records = []
    for i in range(total):
        found = [c for c in classes if not (c in missing and i % missing[c] == 0)]
        dets = [
            {"class_id": k, "class_name": c, "confidence": confidence, "xc": 0.5, "yc": 0.5, "w": 0.2, "h": 0.1}
            for k, c in enumerate(found)
        ]
        records.append(
            Record(
                ts=start + i * DAY / per_day,
                request_id=new_request_id(),
                endpoint="invocations",
                status=200,
                model_version=version,
                latency_ms=latency_ms,
                request_ms=latency_ms,
                batch_size=1,
                image_sha256=f"{i:064x}",
                width=256,
                height=320,
                **detection_fields(dets),
            )
        )
    store.write(records)
    return total


def write_reports(inbox: Path, weekly: list[int], until: float) -> None:
    """An inbox manifest with ``weekly[k]`` reports in week k of the ``len(weekly)`` weeks ending at ``until``."""
    from datetime import UTC, datetime

    from detloop.data.manifest import write_manifest

    rows = []
    for k, count in enumerate(weekly):
        week_start = until - (len(weekly) - k) * 7 * DAY
        for j in range(count):
            when = datetime.fromtimestamp(week_start + DAY + j * HOUR, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            rows.append(
                {
                    "id": f"report-{k:02d}{j:010d}",
                    "sha256": f"{k:02d}{j:062d}",
                    "source": "/reports/x.jpg",
                    "reported_at": when,
                    "has_labels": False,
                }
            )
    write_manifest(inbox / "manifest.jsonl", rows)
