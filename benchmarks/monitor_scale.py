"""``detloop monitor`` over a 1,000,000-row prediction log.

Writes a SQLite prediction log (the server's schema and settings, ``detloop.production.predlog``) of ``--rows``
scored images spread over 28 days: version 1 for three weeks, then version 2; the six demo classes,
each detected in 85-99 % of the images with one to two boxes, confidences around 0.8, latencies around
25 ms, and 1 % refused requests. Then it times:

* ``monitor.run`` without MLflow over the last 7 days (a quarter of the rows) and over all 28 days;
* ``detloop monitor`` end to end as a subprocess (process start, Hydra, the log, MLflow logging to an
  existing SQLite store), over the last 7 days.

Results go to ``build/benchmarks/monitor_scale.json`` with the load average next to every timing.

    .venv/bin/python benchmarks/monitor_scale.py [--rows 1000000] [--workdir PATH]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DETLOOP_ROOT", str(ROOT))

from shared import load_average, write_report  # noqa: E402

import detloop  # noqa: E402,F401  (offline environment)
from detloop.core.config import compose  # noqa: E402
from detloop.data.demo import CLASSES  # noqa: E402
from detloop.production import monitor, monitor_rules, predlog  # noqa: E402

OUT = ROOT / "build" / "benchmarks" / "monitor_scale.json"
UNTIL = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
DAYS = 28
BATCH = 50_000


def rows(n: int, seed: int = 0):
    """``n`` log rows as dicts, oldest first (deterministic)."""
    rng = random.Random(seed)
    rates = dict(zip(CLASSES, (0.99, 0.97, 0.95, 0.9, 0.88, 0.85), strict=True))
    start = UNTIL - DAYS * monitor_rules.DAY
    for i in range(n):
        ts = start + i * DAYS * monitor_rules.DAY / n
        status = 400 if rng.random() < 0.01 else 200
        dets = []
        if status == 200:
            for k, name in enumerate(CLASSES):
                if rng.random() < rates[name]:
                    for _ in range(1 + (rng.random() < 0.3)):
                        dets.append(
                            {
                                "class_id": k,
                                "class_name": name,
                                "confidence": min(rng.gauss(0.8, 0.08), 1.0),
                                "xc": rng.random(),
                                "yc": rng.random(),
                                "w": 0.1,
                                "h": 0.05,
                            }
                        )
        latency = max(rng.gauss(25.0, 4.0), 1.0)
        version = "1" if ts < start + 21 * monitor_rules.DAY else "2"
        yield {
            "ts": ts,
            "request_id": f"{i:032x}",
            "endpoint": "invocations",
            "status": status,
            "error": None if status == 200 else "row 0: not a decodable image",
            "model_version": version,
            "latency_ms": latency,
            "request_ms": latency,
            "batch_size": 1,
            "image_sha256": f"{i:064x}",
            "image_path": None,
            "width": 256,
            "height": 320,
            **predlog.detection_fields(dets),
        }


def write_log(store: predlog.PredictionLog, n: int) -> float:
    started = time.perf_counter()
    batch = []
    for row in rows(n):
        batch.append(row)
        if len(batch) == BATCH:
            with store.engine.begin() as conn:
                conn.execute(predlog.predictions.insert(), batch)
            batch = []
    if batch:
        with store.engine.begin() as conn:
            conn.execute(predlog.predictions.insert(), batch)
    return time.perf_counter() - started


def timed(fn, repeats: int = 3) -> dict:
    seconds, result = [], None
    before = load_average()
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - started)
    return {
        "seconds": [round(s, 2) for s in seconds],
        "load_before": before,
        "load_after": load_average(),
        "result": result,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in the prediction log")
    parser.add_argument("--workdir", type=Path, help="keep the work folder (and reuse its log) here")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="detloop-monitor-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    overrides = [
        "experiment=tiny",
        f"paths.data={work / 'data'}",
        f"paths.build={work / 'build'}",
        f"mlflow.store_dir={work / 'mlruns'}",
        "mlflow.tracking_uri=null",
        f"serve.predlog=sqlite:///{work / 'predlog.db'}",
        f"monitor.expected_classes=[{','.join(CLASSES)}]",
    ]
    cfg = compose(overrides)
    result: dict = {"rows": args.rows, "cpus": os.cpu_count()}
    try:
        store = predlog.open_log(cfg)
        if store.count() != args.rows:
            store.close()
            (work / "predlog.db").unlink(missing_ok=True)
            store = predlog.open_log(cfg)
            result["write_seconds"] = round(write_log(store, args.rows), 1)
        result["db_mb"] = round((work / "predlog.db").stat().st_size / 1e6, 1)
        for name, days in (("last_7_days", 7), ("all_28_days", DAYS)):
            window = monitor_rules.Window(UNTIL - days * monitor_rules.DAY, UNTIL)
            found = timed(lambda w=window: monitor.run(cfg, w, log_store=store, to_mlflow=False))
            found["images"] = found["result"]["images"]
            found["alerts"] = [a["message"] for a in found.pop("result")["alerts"]]
            result[name] = found
        store.close()
        # end to end: a second call, so the MLflow store exists already (as in production)
        command = [
            str(Path(sys.executable).parent / "detloop"),
            "monitor",
            "--until",
            "2026-01-01",
            "--window-days",
            "7",
            *overrides,
        ]
        subprocess.run(command, capture_output=True, check=False)
        before = load_average()
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        result["cli_last_7_days"] = {
            "seconds": round(time.perf_counter() - started, 2),
            "exit": done.returncode,
            "load_before": before,
            "load_after": load_average(),
            "output": done.stdout.strip().splitlines()[-3:],
        }
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    write_report(OUT, result)


if __name__ == "__main__":
    main()
