"""The gate's evaluator: inference time vs metric time, and detloop's COCO mAP against other tools.

1. **Metric step on the same predictions**: detloop's ``coco_map``, pycocotools ``COCOeval``,
   faster-coco-eval ``COCOeval_faster`` and FiftyOne ``evaluate_detections(method="coco",
   compute_mAP=True)`` on (a) a synthetic 5,000-image test set (about 5 objects and 50 detections
   at conf >= 0.001 per image, six classes) and (b) the demo base model's predictions on the 120
   anchor-test pages. Each tool's wall time is split into input conversion (its own data format)
   and the metric computation; mAP50 / mAP50-95 are compared with pycocotools.
2. **Inference**: ``predict`` of yolov8n at 160 px over 5,000 generated demo pages, with the
   trained demo base model (realistic number of boxes through NMS) and with an untrained yolov8n
   built from ``yolov8n.yaml`` and saved as a .pt (no download); then the whole metric step
   (``evaluate_predictions``: mAP and detection rate) on the trained model's predictions.

    .venv/bin/python benchmarks/gate_metrics.py [--images 5000] [--repeats 3] [--skip-fiftyone]
        [--skip-inference] [--weights build/base/runs/<run>/weights/best.pt] [--workdir DIR]

Results go to ``build/benchmarks/gate_metrics.json``. Timings are wall-clock on a shared machine:
the system load average is recorded next to each part.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from shared import load_average

import detloop  # noqa: F401  (offline environment before Ultralytics / FiftyOne load)
from detloop.core.env import project_root
from detloop.evaluation.evaluator import (
    Detections,
    GroundTruth,
    coco_map,
    evaluate_predictions,
    load_ground_truth,
    predict,
)

log = logging.getLogger("gate_metrics")

IMGSZ = 160
BATCH = 16
PAGE = (256, 320)  # demo page width, height
N_CLASSES = 6


# --------------------------------------------------------------------------------------- helpers
def best_time(fn: Callable[[], object], repeats: int) -> tuple[float, object, list[float]]:
    """Minimum wall time over ``repeats`` calls (one call when the first takes > 5 s)."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        if times[0] > 5:
            break
    return min(times), result, times


def synthetic_set(n_images: int, seed: int = 0) -> tuple[list[GroundTruth], list[Detections]]:
    """About 5 objects per image (Poisson), and 50 detections: 0-4 jittered copies of each object
    (10 % with a wrong class, scores ~ Beta(4, 2)) plus background boxes scored 0.001-0.3."""
    rng = np.random.default_rng(seed)
    size = np.array(PAGE, dtype=float)
    gts, dets = [], []
    for _ in range(n_images):
        n = rng.poisson(5)
        wh = rng.uniform(0.05, 0.5, (n, 2)) * size
        xy = rng.uniform(0, 1, (n, 2)) * (size - wh)
        boxes, cls = np.concatenate([xy, xy + wh], 1), rng.integers(0, N_CLASSES, n)
        src = np.repeat(np.arange(n), rng.integers(0, 5, n))
        pred = boxes[src] + rng.normal(0, 0.1, (len(src), 4)) * np.tile(wh[src], 2)
        pred_cls = cls[src].copy()
        flip = rng.random(len(src)) < 0.1
        pred_cls[flip] = rng.integers(0, N_CLASSES, int(flip.sum()))
        conf = np.clip(rng.beta(4, 2, len(src)), 0.001, 1)
        n_bg = max(0, 50 - len(src))
        bg_wh = rng.uniform(0.03, 0.5, (n_bg, 2)) * size
        bg_xy = rng.uniform(0, 1, (n_bg, 2)) * (size - bg_wh)
        pred = np.clip(np.concatenate([pred, np.concatenate([bg_xy, bg_xy + bg_wh], 1)]), 0, np.tile(size, 2))
        pred_cls = np.concatenate([pred_cls, rng.integers(0, N_CLASSES, n_bg)])
        conf = np.concatenate([conf, rng.uniform(0.001, 0.3, n_bg)])
        gts.append(GroundTruth(boxes, cls))
        dets.append(Detections(pred, pred_cls, conf))
    return gts, dets


# ---------------------------------------------------------------------------------- COCO formats
def coco_dicts(gts: list[GroundTruth], dets: list[Detections], class_ids: list[int]) -> tuple[dict, list[dict]]:
    """COCO ground-truth dataset and result list: xywh boxes, area w*h, ids from 1, no crowd."""
    images, annotations, results = [], [], []
    for image_id, (gt, det) in enumerate(zip(gts, dets, strict=True), start=1):
        images.append({"id": image_id, "width": PAGE[0], "height": PAGE[1]})
        for (x1, y1, x2, y2), c in zip(gt.boxes.tolist(), gt.cls.tolist(), strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": c,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
        for (x1, y1, x2, y2), c, s in zip(det.boxes.tolist(), det.cls.tolist(), det.conf.tolist(), strict=True):
            results.append({"image_id": image_id, "category_id": c, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s})
    dataset = {"images": images, "annotations": annotations, "categories": [{"id": c} for c in class_ids]}
    return dataset, results


def run_pycocotools(dataset: dict, results: list[dict], repeats: int) -> dict:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def convert():
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO()
            gt.dataset = json.loads(json.dumps(dataset))  # COCO keeps and mutates the dicts
            gt.createIndex()
            return gt, gt.loadRes(json.loads(json.dumps(results)))

    def compute(gt, dt):
        with contextlib.redirect_stdout(io.StringIO()):
            run = COCOeval(gt, dt, "bbox")
            run.evaluate()
            run.accumulate()
            run.summarize()
        return run.stats

    return _coco_tool("pycocotools COCOeval", convert, compute, repeats)


def run_faster_coco_eval(dataset: dict, results: list[dict], repeats: int, *, all_area_only: bool = False) -> dict:
    from faster_coco_eval import COCO, COCOeval_faster

    def convert():
        gt = COCO(json.loads(json.dumps(dataset)))
        return gt, gt.loadRes(json.loads(json.dumps(results)))

    def compute(gt, dt):
        run = COCOeval_faster(gt, dt, "bbox", print_function=log.debug)
        if all_area_only:  # only what detloop computes: area "all", 100 detections
            run.params.areaRng, run.params.areaRngLbl, run.params.maxDets = [[0, 1e10]], ["all"], [100]
        run.evaluate()
        run.accumulate()
        if all_area_only:
            p = run.eval["precision"][:, :, :, 0, 0]
            valid = (p > -1).all(axis=(0, 1))
            return [p[:, :, valid].mean(), p[0][:, valid].mean()]
        run.summarize()
        return run.stats

    name = "faster-coco-eval COCOeval_faster" + (" (area all, maxDets 100 only)" if all_area_only else "")
    return _coco_tool(name, convert, compute, repeats)


def _coco_tool(name: str, convert: Callable, compute: Callable, repeats: int) -> dict:
    convert_s, (gt, dt), _ = best_time(convert, 1)
    metric_s, stats, times = best_time(lambda: compute(gt, dt), repeats)
    return {
        "tool": name,
        "convert_s": convert_s,
        "metric_s": metric_s,
        "metric_runs_s": times,
        "map50": float(stats[1]),
        "map50_95": float(stats[0]),
    }


def run_detloop(gts: list[GroundTruth], dets: list[Detections], class_ids: list[int], repeats: int) -> dict:
    metric_s, result, times = best_time(lambda: coco_map(gts, dets, class_ids), repeats)
    return {
        "tool": "detloop coco_map",
        "convert_s": 0.0,
        "metric_s": metric_s,
        "metric_runs_s": times,
        "map50": result["map50"],
        "map50_95": result["map50_95"],
    }


# ------------------------------------------------------------------------------------------ FiftyOne
def run_fiftyone(gts: list[GroundTruth], dets: list[Detections], names: dict[int, str], tag: str) -> dict:
    """FiftyOne's COCO evaluation (relative xywh boxes; the per-sample eval fields are written to its DB)."""
    import fiftyone as fo

    width, height = PAGE

    def detections(boxes: np.ndarray, cls: np.ndarray, conf: np.ndarray | None) -> fo.Detections:
        rel = np.column_stack(
            [
                boxes[:, 0] / width,
                boxes[:, 1] / height,
                (boxes[:, 2] - boxes[:, 0]) / width,
                (boxes[:, 3] - boxes[:, 1]) / height,
            ]
        )
        scores = conf.tolist() if conf is not None else [None] * len(cls)
        return fo.Detections(
            detections=[
                fo.Detection(label=names[c], bounding_box=b, confidence=s)
                for b, c, s in zip(rel.tolist(), cls.tolist(), scores, strict=True)
            ]
        )

    start = time.perf_counter()
    dataset = fo.Dataset(f"gate-metrics-{tag}-{os.getpid()}")
    samples = []
    for i, (gt, det) in enumerate(zip(gts, dets, strict=True)):
        sample = fo.Sample(filepath=f"/nonexistent/{tag}/{i:06d}.jpg")
        sample["gt"] = detections(gt.boxes, gt.cls, None)
        sample["pred"] = detections(det.boxes, det.cls, det.conf)
        samples.append(sample)
    dataset.add_samples(samples, progress=False)
    convert_s = time.perf_counter() - start
    start = time.perf_counter()
    results = dataset.evaluate_detections(
        "pred",
        gt_field="gt",
        eval_key="ev",
        method="coco",
        compute_mAP=True,
        classes=[names[c] for c in sorted(names)],
        progress=False,
    )
    metric_s = time.perf_counter() - start
    at50 = results.precision[0]  # (classes, 101) at IoU 0.5; -1 for classes without objects
    map50 = float(at50[(at50 > -1).all(axis=1)].mean())
    dataset.delete()
    return {
        "tool": "FiftyOne evaluate_detections (coco)",
        "convert_s": convert_s,
        "metric_s": metric_s,
        "metric_runs_s": [metric_s],
        "map50": map50,
        "map50_95": float(results.mAP()),
    }


# ------------------------------------------------------------------------------------ comparisons
def compare_tools(
    gts: list[GroundTruth], dets: list[Detections], names: dict[int, str], *, repeats: int, fiftyone: bool, tag: str
) -> dict:
    """Every tool on the same predictions; differences of mAP to pycocotools."""
    class_ids = sorted(names)
    load_before = load_average()
    rows = [run_detloop(gts, dets, class_ids, repeats)]
    dataset, results = coco_dicts(gts, dets, class_ids)
    rows.append(run_pycocotools(dataset, results, repeats))
    rows.append(run_faster_coco_eval(dataset, results, repeats))
    rows.append(run_faster_coco_eval(dataset, results, repeats, all_area_only=True))
    if fiftyone:
        rows.append(run_fiftyone(gts, dets, names, tag))
    reference = rows[1]
    for row in rows:
        row["map50_diff"] = row["map50"] - reference["map50"]
        row["map50_95_diff"] = row["map50_95"] - reference["map50_95"]
        log.info(
            "%-55s convert %7.3f s  metric %8.3f s  mAP50 %.6f  mAP50-95 %.6f",
            row["tool"],
            row["convert_s"],
            row["metric_s"],
            row["map50"],
            row["map50_95"],
        )
    return {
        "images": len(gts),
        "objects": int(sum(len(g.cls) for g in gts)),
        "detections": int(sum(len(d.cls) for d in dets)),
        "load_average": [load_before, load_average()],
        "tools": rows,
    }


# ------------------------------------------------------------------------------------------ inference
def write_pages(folder: Path, n: int) -> list[Path]:
    """``n`` demo pages (anchor layouts, round robin) with labels under folder/images, folder/labels."""
    from detloop.core.config import compose
    from detloop.data.demo import render_sample

    demo = compose([]).demo
    templates = list(demo.anchor.templates)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(n):
        image = folder / "images" / f"page-{i:05d}.jpg"
        if not image.is_file():
            sample = render_sample(demo, "gate-metrics", i, templates[i % len(templates)], scanned=False)
            (folder / "labels" / f"page-{i:05d}.txt").write_bytes(sample.labels)
            image.write_bytes(sample.image)
        images.append(image)
    return images


def untrained_weights(folder: Path) -> Path:
    """yolov8n from its architecture yaml (random weights), saved as a .pt: no download needed."""
    from detloop.model.yolo import ultralytics

    path = folder / "yolov8n-untrained.pt"
    if not path.is_file():
        ultralytics().YOLO("yolov8n.yaml").save(str(path))
    return path


def time_predict(weights: Path, images: list[Path]) -> tuple[dict, list[Detections]]:
    import torch

    start = time.perf_counter()
    predict(weights, images[:1], imgsz=IMGSZ, batch=BATCH, device="cpu")
    one_image_s = time.perf_counter() - start  # model load + warm-up + one image: the fixed cost
    load_before = load_average()
    start = time.perf_counter()
    dets = predict(weights, images, imgsz=IMGSZ, batch=BATCH, device="cpu")
    seconds = time.perf_counter() - start
    row = {
        "weights": str(weights),
        "images": len(images),
        "imgsz": IMGSZ,
        "batch": BATCH,
        "inference_s": seconds,
        "images_per_s": len(images) / seconds,
        "one_image_s": one_image_s,
        "detections": int(sum(len(d.cls) for d in dets)),
        "torch_threads": torch.get_num_threads(),
        "load_average": [load_before, load_average()],
    }
    log.info("predict %s on %d images: %.1f s (%.0f img/s)", weights.name, len(images), seconds, len(images) / seconds)
    return row, dets


def model_names(weights: Path) -> dict[int, str]:
    from detloop.model.yolo import load_model

    return {int(k): str(v) for k, v in load_model(weights).names.items()}


def inference_part(workdir: Path, n_images: int, trained: Path | None) -> dict:
    """Predict over ``n_images`` generated pages; metric step on the trained model's predictions."""
    start = time.perf_counter()
    images = write_pages(workdir / "pages", n_images)
    out: dict = {"pages_written_s": time.perf_counter() - start}
    start = time.perf_counter()
    gts = load_ground_truth(images)
    out["ground_truth_s"] = time.perf_counter() - start
    out["untrained"], _ = time_predict(untrained_weights(workdir), images)
    if trained is not None:
        out["trained"], dets = time_predict(trained, images)
        result = evaluate_predictions(gts, dets, model_names(trained))
        out["trained"]["evaluate_predictions"] = {
            k: result[k] for k in ("images", "objects", "detections", "map50", "map50_95", "timings")
        }
        out["trained"]["evaluate_predictions"]["detection_rate"] = result["detection_rate"]["rate"]
        metric_s, _, _ = best_time(lambda: coco_map(gts, dets, sorted(model_names(trained))), 3)
        out["trained"]["coco_map_s"] = metric_s
    return out


def demo_part(trained: Path, repeats: int, fiftyone: bool) -> dict:
    """The demo base model on the 120 anchor-test pages: inference, then every tool on its predictions."""
    images = sorted((project_root() / "data" / "anchor" / "images" / "test").glob("*.jpg"))
    names = model_names(trained)
    start = time.perf_counter()
    gts = load_ground_truth(images, num_classes=len(names))
    ground_truth_s = time.perf_counter() - start
    row, dets = time_predict(trained, images)
    result = evaluate_predictions(gts, dets, names)
    return {
        "predict": row,
        "ground_truth_s": ground_truth_s,
        "evaluate_predictions": {
            k: result[k]
            for k in ("images", "objects", "detections", "map50", "map50_95", "per_class", "detection_rate", "timings")
        },
        "metrics": compare_tools(gts, dets, names, repeats=repeats, fiftyone=fiftyone, tag="demo"),
    }


def newest_base_weights() -> Path | None:
    found = sorted((project_root() / "build" / "base" / "runs").glob("*/weights/best.pt"), key=os.path.getmtime)
    return found[-1] if found else None


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000, help="size of the synthetic and generated test sets")
    parser.add_argument("--repeats", type=int, default=3, help="metric runs per tool (best time is reported)")
    parser.add_argument("--weights", type=Path, default=None, help="trained yolov8n .pt (default: newest base run)")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=project_root() / "build" / "benchmarks" / "gate_metrics_work",
        help="generated pages (kept and reused) and FiftyOne's database",
    )
    parser.add_argument("--skip-fiftyone", action="store_true")
    parser.add_argument("--skip-inference", action="store_true")
    parser.add_argument("--out", type=Path, default=project_root() / "build" / "benchmarks" / "gate_metrics.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("fiftyone", "ultralytics", "faster_coco_eval"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    workdir = args.workdir
    os.environ.setdefault("FIFTYONE_DATABASE_DIR", str(workdir / "fiftyone-db"))
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    os.environ.setdefault("FIFTYONE_SHOW_PROGRESS_BARS", "false")
    trained = args.weights or newest_base_weights()
    report: dict = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "load_average_start": load_average()},
        "settings": {"imgsz": IMGSZ, "batch": BATCH, "repeats": args.repeats, "trained_weights": str(trained)},
    }
    gts, dets = synthetic_set(args.images)
    names = {i: f"class{i}" for i in range(N_CLASSES)}
    report["synthetic"] = compare_tools(
        gts, dets, names, repeats=args.repeats, fiftyone=not args.skip_fiftyone, tag="synthetic"
    )
    if trained is not None:
        report["demo"] = demo_part(trained, args.repeats, fiftyone=not args.skip_fiftyone)
    if not args.skip_inference:
        report["inference"] = inference_part(workdir, args.images, trained)
    report["machine"]["load_average_end"] = load_average()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
