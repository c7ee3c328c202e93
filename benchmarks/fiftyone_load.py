"""FiftyOne at scale: load N samples with ground truth and predictions, then evaluate_detections.

    .venv/bin/python benchmarks/fiftyone_load.py [--samples 5000] [--objects 5] [--seed 0] [--rounds 3]

Writes N small page-like JPEGs with YOLO labels as an anchor test split in a temporary folder,
starts a private mongod (FiftyOne's binary) on a free port, and times with detloop's own code:

* loading with predictions, ``--rounds`` times each way, alternating, on the same images and
  predictions (jittered ground truth plus false positives, random confidences), each into a new
  dataset: ``fo_load.load_set`` (samples with ground truth and image metadata) then
  ``fo_load.store_predictions`` (what ``add_predictions`` does after inference: one keyed
  ``set_values``), once as stored documents (``fo_load.fast_writes()``, FiftyOne 1.22.0) and once
  through ``fo.Sample`` / ``fo.Detections`` objects, ``add_samples`` and validated ``set_values``
  (the way every FiftyOne version is written, and what detloop did before);
* ``fo_eval.evaluate`` (COCO method, mAP; the tutorial reports ~140 samples/s on its machine)
  and, on the same predictions, the gate's evaluator (``evaluator.coco_map``) for comparison;
* what ``detloop inspect`` does instead (``fiftyone.inspect.store_conf``): store the boxes at the serving
  confidence and match them per sample (TP/FP/FN, no mAP), mAP from the gate's evaluator.

Prints a JSON record with the machine's load average and writes it to
``build/benchmarks/fiftyone_load.json``. Needs no network and no model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import fiftyone as fo
import numpy as np
import shared

from detloop.core.config import compose
from detloop.core.env import project_root
from detloop.evaluation import evaluator
from detloop.fiftyone import eval as fo_eval
from detloop.fiftyone import load as fo_load
from detloop.fiftyone.db import connect, start_mongod, stop_mongod

NAMES = {0: "title", 1: "date", 2: "amount", 3: "table", 4: "signature", 5: "stamp"}
WIDTH, HEIGHT = 128, 160


def write_split(root: Path, n: int, objects: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` JPEGs with ``objects`` labelled boxes each under ``root/anchor``; returns the label rows."""
    from PIL import Image, ImageDraw

    images, labels = root / "anchor/images/test", root / "anchor/labels/test"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    (root / "anchor/data.yaml").write_text(
        f"path: .\ntrain: images/test\nval: images/test\ntest: images/test\nnames: {json.dumps(NAMES)}\n"
    )
    rows = []
    for i in range(n):
        page = Image.new("L", (WIDTH, HEIGHT), 235)
        draw = ImageDraw.Draw(page)
        wh = rng.uniform(0.08, 0.3, (objects, 2))
        xy = rng.uniform(0, 1, (objects, 2)) * (1 - wh) + wh / 2
        row = np.column_stack([rng.integers(0, len(NAMES), objects), xy, wh])
        for _, xc, yc, w, h in row:
            draw.rectangle(
                [(xc - w / 2) * WIDTH, (yc - h / 2) * HEIGHT, (xc + w / 2) * WIDTH, (yc + h / 2) * HEIGHT], outline=40
            )
        page.save(images / f"page{i:05d}.jpg", quality=80)
        (labels / f"page{i:05d}.txt").write_text(
            "".join(f"{int(c)} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in row)
        )
        rows.append(row)
    return rows


def predictions(rows: list[np.ndarray], rng: np.random.Generator) -> list[evaluator.Detections]:
    """Jittered ground truth (10 % misses, 10 % wrong class) plus up to two false positives, in pixels."""
    out = []
    for row in rows:
        keep = row[rng.random(len(row)) > 0.1]
        centre = keep[:, 1:3] + rng.normal(0, 0.01, (len(keep), 2))
        half = keep[:, 3:5] / 2
        boxes = np.column_stack([centre - half, centre + half]) * [WIDTH, HEIGHT, WIDTH, HEIGHT]
        cls = np.where(rng.random(len(keep)) < 0.1, (keep[:, 0] + 1) % len(NAMES), keep[:, 0]).astype(int)
        extra = int(rng.integers(0, 3))
        corner = rng.uniform(0, 0.7, (extra, 2)) * [WIDTH, HEIGHT]
        boxes = np.vstack([boxes, np.column_stack([corner, corner + rng.uniform(8, 30, (extra, 2))])])
        cls = np.concatenate([cls, rng.integers(0, len(NAMES), extra)])
        out.append(evaluator.Detections(boxes, cls, rng.uniform(0.05, 1.0, len(cls))))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--objects", type=int, default=5, help="ground-truth objects per image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3, help="loads with predictions per way, alternating")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    load_before = os.getloadavg()
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    with tempfile.TemporaryDirectory(prefix="detloop-fo-bench-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        rows = write_split(root / "data", args.samples, args.objects, rng)
        write_s = time.perf_counter() - started
        server = start_mongod(root / "db", detach=False)
        try:
            record = measure(root, server.uri, rows, rng, args)
        finally:
            stop_mongod(server)
    record.update(
        {
            "write_images_s": round(write_s, 2),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "cpu_count": os.cpu_count(),
            "cpu": cpu,
            "fiftyone": fo.__version__,
            "python": sys.version.split()[0],
        }
    )
    out = project_root() / "build" / "benchmarks" / "fiftyone_load.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


@contextlib.contextmanager
def writes(fast: bool):
    """``fo_load`` writing stored documents (``fast``, as it does with FiftyOne 1.22.0) or FiftyOne objects."""
    chosen = fo_load.fast_writes
    fo_load.fast_writes = lambda: fast and chosen()
    try:
        yield
    finally:
        fo_load.fast_writes = chosen


def load_with_predictions(cfg, found: list[tuple], fast: bool) -> tuple[object, dict]:
    """``load_set`` of anchor-test then ``store_predictions`` into a new dataset; the dataset and the times."""
    with writes(fast):
        started = time.perf_counter()
        dataset = fo_load.load_set(cfg, "anchor-test", NAMES)
        loaded = time.perf_counter()
        paths = dataset.values("filepath")  # in file-name order, as the generated rows
        fo_load.store_predictions(
            dataset, dataset, "predictions_bench", paths, found, [(WIDTH, HEIGHT)] * len(paths), NAMES
        )
        stored = time.perf_counter()
    return dataset, {
        "load_set_s": round(loaded - started, 2),
        "store_predictions_s": round(stored - loaded, 2),
        "total_s": round(stored - started, 2),
        "samples_per_s": round(len(dataset) / (stored - started), 1),
        "loadavg": shared.load_average(),
    }


def measure(root: Path, uri: str, rows: list[np.ndarray], rng: np.random.Generator, args) -> dict:
    cfg = compose(
        [
            f"paths.data={root / 'data'}",
            f"paths.build={root / 'build'}",
            f"fiftyone.database.uri={uri}",
            "fiftyone.dataset_prefix=bench",
        ]
    )
    connect(cfg)
    dets = predictions(rows, rng)  # rows are in file-name order, as the dataset's samples
    found = [(d.boxes, d.cls, d.conf, None) for d in dets]
    rounds: dict[str, list[dict]] = {"objects": [], "documents": []}
    dataset = None
    for index in range(args.rounds):
        for way, fast in (("objects", False), ("documents", True)):
            if dataset is not None:
                dataset.delete()
            cfg.fiftyone.dataset_prefix = f"bench-{way}-{index}"
            dataset, times = load_with_predictions(cfg, found, fast)
            rounds[way].append(times)
            print(f"round {index + 1} {way}: {times}", file=sys.stderr)
    paths = dataset.values("filepath")
    current = rounds["documents" if fo_load.fast_writes() else "objects"]  # the way load.py writes here
    load_s = statistics.median(r["load_set_s"] for r in current)
    total_s = statistics.median(r["total_s"] for r in current)
    started = time.perf_counter()
    results = fo_eval.evaluate(dataset, "predictions_bench", cfg)
    evaluate_s = time.perf_counter() - started
    figures = fo_eval.figures(results)
    gts = evaluator.load_ground_truth([Path(p) for p in paths])
    started = time.perf_counter()
    gate = evaluator.coco_map(gts, dets, NAMES)
    gate_s = time.perf_counter() - started
    # `detloop inspect` (fiftyone.inspect.store_conf): the boxes at the serving confidence are stored and
    # matched per sample (TP/FP/FN at IoU 0.5, no mAP); mAP is the gate evaluator's on every box (above)
    serving = float(cfg.fiftyone.inspect.store_conf)
    started = time.perf_counter()
    fo_load.store_predictions(
        dataset, dataset, "predictions_served", paths, found, [(WIDTH, HEIGHT)] * len(paths), NAMES, min_conf=serving
    )
    store_served_s = time.perf_counter() - started
    started = time.perf_counter()
    fo_eval.evaluate(dataset, "predictions_served", cfg, compute_mAP=False, iou=float(cfg.gate.new_samples.iou))
    match_served_s = time.perf_counter() - started
    n = len(dataset)
    return {
        "samples": n,
        "objects": int(sum(len(r) for r in rows)),
        "predictions": int(sum(len(d.cls) for d in dets)),
        "fast_writes": fo_load.fast_writes(),
        "load_set_s": round(load_s, 2),
        "load_samples_per_s": round(n / load_s, 1),
        "store_predictions_s": round(statistics.median(r["store_predictions_s"] for r in current), 2),
        "load_with_predictions_s": round(total_s, 2),
        "load_with_predictions_samples_per_s": round(n / total_s, 1),
        "load_with_predictions": {
            way: {
                "rounds": times,
                "median_s": round(statistics.median(r["total_s"] for r in times), 2),
                "median_samples_per_s": round(n / statistics.median(r["total_s"] for r in times), 1),
                "median_load_set_s": round(statistics.median(r["load_set_s"] for r in times), 2),
                "median_store_predictions_s": round(statistics.median(r["store_predictions_s"] for r in times), 2),
            }
            for way, times in rounds.items()
        },
        "evaluate_detections_s": round(evaluate_s, 2),
        "evaluate_samples_per_s": round(n / evaluate_s, 1),
        "fiftyone_map50": round(figures["map50"], 6),
        "fiftyone_map50_95": round(figures["map50_95"], 6),
        "gate_map50": round(gate["map50"], 6),
        "gate_map50_95": round(gate["map50_95"], 6),
        "gate_coco_map_s": round(gate_s, 3),
        "served_conf": serving,
        "served_predictions": dataset.count("predictions_served.detections"),
        "store_served_predictions_s": round(store_served_s, 2),
        "match_served_s": round(match_served_s, 2),
        "match_served_samples_per_s": round(n / match_served_s, 1),
        "inspect_path_s": round(load_s + store_served_s + match_served_s + gate_s, 2),
        "inspect_path_samples_per_s": round(n / (load_s + store_served_s + match_served_s + gate_s), 1),
    }


if __name__ == "__main__":
    sys.exit(main())
