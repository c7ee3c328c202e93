"""Measure `make demo`: wall time per step and per stage, peak RSS, and the demo base model's quality.

Run from a clone whose environment is installed (`make install`):
    .venv/bin/python benchmarks/demo_run.py            # runs the demo steps; JSON report in build/benchmarks/
    .venv/bin/python benchmarks/demo_run.py --no-run   # only measures the current registry/model
Quality figures: anchor-test mAP50 of the production model (from the evaluate stage) and its
detection rate on the reported-failure batch (pool + inbox), per class, at the serving threshold.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from detloop.core.config import compose, resolve_path
from detloop.data.datasets import anchor_names
from detloop.evaluation.metrics import detection_rate, yolo_labels_xyxy
from detloop.tracking import runs

BIN = Path(sys.executable).parent
STEPS = [
    ("demo-data", [str(BIN / "detloop"), "demo-data"]),
    ("dvc commit data.dvc", [str(BIN / "dvc"), "commit", "-f", "-q", "data.dvc"]),
    ("dvc repro", [str(BIN / "dvc"), "repro"]),
    ("registry", [str(BIN / "detloop"), "registry"]),
]


def run_steps() -> list[dict]:
    rows = []
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    for name, cmd in STEPS:
        start = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        rows.append({"step": name, "seconds": round(time.perf_counter() - start, 1), "peak_rss_mb_so_far": round(peak)})
    return rows


def stage_durations(cfg) -> dict[str, float]:
    runs.setup(cfg)
    found = mlflow.search_runs(experiment_names=[cfg.mlflow.experiment], output_format="list")
    out = {}
    for run in sorted(found, key=lambda r: r.info.start_time):
        stage = run.data.tags.get("stage")
        if stage and run.info.end_time:
            out[stage] = round((run.info.end_time - run.info.start_time) / 1000, 1)
    return out


def detection_on(cfg, model_uri: str, images: list[Path]) -> dict:
    """Detection rate of ``model_uri`` on ``images`` (labels beside them), per class and ignoring class."""
    from PIL import Image

    model = mlflow.pyfunc.load_model(model_uri)
    names = anchor_names(resolve_path(cfg, "anchor"))
    preds = model.predict(pd.DataFrame({"image": [str(p) for p in images]}))
    samples = []
    for i, path in enumerate(images):
        w, h = Image.open(path).size
        gt_boxes, gt_cls = yolo_labels_xyxy(path.parent.parent / "labels" / f"{path.stem}.txt", w, h)
        p = preds[preds["row"] == i]
        samples.append(
            (
                gt_boxes,
                gt_cls,
                p[["x1", "y1", "x2", "y2"]].to_numpy(),
                p["class_id"].to_numpy(),
                p["confidence"].to_numpy(),
            )
        )
    aware = detection_rate(samples, names, conf=0.0).as_dict()  # predictions are already at serving conf
    agnostic = detection_rate(samples, names, conf=0.0, class_aware=False).as_dict()
    return {"images": len(images), "class_aware": aware, "class_agnostic_rate": agnostic["rate"]}


def failure_images(cfg) -> list[Path]:
    return sorted((resolve_path(cfg, "pool") / "images").iterdir()) + sorted(
        (resolve_path(cfg, "inbox") / "images").iterdir()
    )


def finetune_figures(cfg) -> dict | None:
    """The demo fine-tune next to its base: anchor-test mAP50 and pool-holdout detection rate."""
    from detloop.data.pool import pool_samples
    from detloop.evaluation.measure import evaluate_model

    path = resolve_path(cfg, "build") / "finetune" / "model.json"
    model = json.loads(path.read_text()) if path.is_file() else {}
    if "version" not in model:
        return None
    holdout = pool_samples(cfg, "holdout")
    base_uri = f"models:/{cfg.mlflow.registered_model}/{model['base_version']}"
    return {
        "version": model["version"],
        "base_version": model["base_version"],
        "anchor_test_map50": {
            "base": evaluate_model(cfg, base_uri)["map50"],
            "finetune": evaluate_model(cfg, model["model_uri"])["map50"],
        },
        "pool_holdout_detection": {
            "base": detection_on(cfg, base_uri, holdout),
            "finetune": detection_on(cfg, model["model_uri"], holdout),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-run", action="store_true", help="measure the existing results only")
    parser.add_argument("--out", default="build/benchmarks/demo_run.json", help="where to write the JSON report")
    args = parser.parse_args()
    report = {}
    start = time.perf_counter()
    if not args.no_run:
        report["steps"] = run_steps()
        report["total_seconds"] = round(time.perf_counter() - start, 1)
    cfg = compose([])
    runs.setup(cfg)
    report["stage_run_seconds"] = stage_durations(cfg)
    evaluate = json.loads((resolve_path(cfg, "build") / "evaluate" / "metrics.json").read_text())
    report["anchor_test_map50"] = round(evaluate["map50"], 4)
    report["anchor_test_map50_95"] = round(evaluate["map50_95"], 4)
    production = f"models:/{cfg.mlflow.registered_model}@production"
    report["failures"] = detection_on(cfg, production, failure_images(cfg))
    report["finetune"] = finetune_figures(cfg)
    text = json.dumps(report, indent=2, default=lambda x: float(x) if isinstance(x, np.floating) else str(x))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    print(text)  # Ultralytics also writes to stdout: read --out for clean JSON


if __name__ == "__main__":
    main()
