"""Is the demo data set learnable, and does it leave the loop something to fix?

1. writes the default demo data into a work folder,
2. trains yolov8n from scratch on anchor train/val (the base stage's settings),
3. reports anchor-test mAP50 and, on the reported failures (pool + inbox), the per-class detection
   rate: the share of ground-truth objects matched by a prediction of the same class with
   IoU >= 0.5 at conf >= 0.25,
4. optionally fine-tunes from the base best.pt (freeze=10, lr0=0.001 SGD, 10 epochs) on pool-train
   plus a replay of anchor-train, and reports the pool-holdout detection rate and anchor-test mAP50.

Targets: anchor-test mAP50 >= 0.8; base detection rate on failures < 0.6; base training <= ~5 min
on a 2-core CPU; after the fine-tune, pool-holdout detection rate > 0.8 with anchor mAP50 within
1 point of the base.

    .venv/bin/python benchmarks/demo_learnability.py --workdir /tmp/detloop-learnability [--finetune]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

import detloop  # noqa: F401  (sets YOLO_CONFIG_DIR, offline and telemetry switches before Ultralytics)
from detloop.core.config import compose
from detloop.data.demo import CLASSES, write_demo_data
from detloop.data.manifest import read_manifest
from detloop.evaluation.metrics import found_objects

BASE_TRAIN = dict(
    epochs=30,
    imgsz=160,
    batch=16,
    optimizer="SGD",
    lr0=0.01,
    seed=0,
    deterministic=True,
    workers=0,
    device="cpu",
    plots=False,
    verbose=False,
)
FINETUNE_TRAIN = dict(
    epochs=10,
    imgsz=160,
    batch=16,
    optimizer="SGD",
    lr0=0.001,
    freeze=10,
    warmup_epochs=1,
    warmup_bias_lr=0.001,
    cos_lr=True,
    seed=0,
    deterministic=True,
    workers=0,
    device="cpu",
    plots=False,
    verbose=False,
)
IOU_MATCH = 0.5
CONF_MATCH = 0.25

log = logging.getLogger("demo_learnability")


# ------------------------------------------------------------------------------------------ matching
def match_image(
    gt_cls: np.ndarray,
    gt_box: np.ndarray,
    pred_cls: np.ndarray,
    pred_box: np.ndarray,
    pred_conf: np.ndarray,
    class_aware: bool = True,
) -> np.ndarray:
    """Which ground-truth objects are found (detloop's one-to-one matcher at IoU >= 0.5)."""
    return found_objects(
        gt_box, gt_cls, pred_box, pred_cls, pred_conf, iou=IOU_MATCH, conf=0.0, class_aware=class_aware
    )


def label_path(image: Path) -> Path:
    """The Ultralytics convention: the last /images/ in the path becomes /labels/, .txt suffix."""
    head, _, tail = str(image).rpartition("/images/")
    return Path(f"{head}/labels/{tail}").with_suffix(".txt")


def read_yolo_labels(path: Path, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    rows = np.loadtxt(path, ndmin=2) if path.stat().st_size else np.zeros((0, 5))
    cls = rows[:, 0].astype(int)
    xc, yc, w, h = rows[:, 1] * width, rows[:, 2] * height, rows[:, 3] * width, rows[:, 4] * height
    return cls, np.stack([xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2], axis=1)


def detection_rate(model, images: list[Path], imgsz: int = 160, class_aware: bool = True) -> dict:
    """Per-class and overall share of ground-truth objects detected (see match_image); with
    ``class_aware=False`` a prediction of any class counts (diagnostic)."""
    found = np.zeros(len(CLASSES), dtype=int)
    total = np.zeros(len(CLASSES), dtype=int)
    for start in range(0, len(images), 32):
        batch = images[start : start + 32]
        results = model.predict([str(p) for p in batch], imgsz=imgsz, conf=CONF_MATCH, device="cpu", verbose=False)
        for image, result in zip(batch, results, strict=True):
            height, width = result.orig_shape
            label = label_path(image)
            gt_cls, gt_box = read_yolo_labels(label, width, height)
            boxes = result.boxes
            hit = match_image(
                gt_cls, gt_box, boxes.cls.numpy().astype(int), boxes.xyxy.numpy(), boxes.conf.numpy(), class_aware
            )
            np.add.at(total, gt_cls, 1)
            np.add.at(found, gt_cls[hit], 1)
    per_class = {name: round(float(f / t), 3) if t else None for name, f, t in zip(CLASSES, found, total, strict=True)}
    return {
        "overall": round(float(found.sum() / max(total.sum(), 1)), 3),
        "per_class": per_class,
        "objects": int(total.sum()),
        "images": len(images),
    }


# -------------------------------------------------------------------------------------------- steps
def write_yaml(path: Path, root: Path, train: str, val: str, test: str | None = None) -> Path:
    lines = [f"path: {root}", f"train: {train}", f"val: {val}"] + ([f"test: {test}"] if test else [])
    lines += [f"nc: {len(CLASSES)}", "names:"] + [f"  {i}: {n}" for i, n in enumerate(CLASSES)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def anchor_map50(model, data_yaml: Path, project: Path) -> float:
    metrics = model.val(
        data=str(data_yaml),
        split="test",
        imgsz=160,
        batch=16,
        device="cpu",
        plots=False,
        project=str(project),
        name="val",
        exist_ok=True,
        verbose=False,
    )
    return round(float(metrics.box.map50), 4)


def per_class_map50(metrics) -> dict:
    return {
        CLASSES[int(c)]: round(float(v), 3) for c, v in zip(metrics.box.ap_class_index, metrics.box.ap50, strict=True)
    }


def mix_lists(data: Path, work: Path, replay: int, seed: int = 0) -> tuple[Path, Path, list[Path]]:
    """Fine-tune lists: pool-train + replay x as many anchor-train pages (drawn without replacement
    while possible, then cycling), val = anchor val + pool val; returns (train, val, pool holdout)."""
    pool = read_manifest(data / "pool" / "manifest.jsonl")
    by_split: dict[str, list[Path]] = {}
    for row in pool:
        by_split.setdefault(row["split"], []).append(data / "pool" / "images" / f"{row['id']}.jpg")
    anchor_train = sorted((data / "anchor" / "images" / "train").glob("*.jpg"))
    rng = np.random.default_rng(seed)
    wanted = replay * len(by_split.get("train", []))
    replayed: list[Path] = []
    while len(replayed) < wanted:
        replayed += [anchor_train[i] for i in rng.permutation(len(anchor_train))]
    train = by_split.get("train", []) + replayed[:wanted]
    val = sorted((data / "anchor" / "images" / "val").glob("*.jpg")) + by_split.get("val", [])
    train_txt, val_txt = work / "finetune_train.txt", work / "finetune_val.txt"
    train_txt.write_text("".join(f"{p}\n" for p in train), encoding="utf-8")
    val_txt.write_text("".join(f"{p}\n" for p in val), encoding="utf-8")
    return train_txt, val_txt, by_split.get("holdout", [])


def prepare_data(work: Path, overrides: list[str]) -> tuple[DictConfig, Path, dict]:
    """Write the demo data (config ``overrides`` applied) into ``work/data``; returns the config
    pointing at it, the data folder and the generation summary (with ``generate_s``)."""
    data = work / "data"
    cfg = compose(
        [
            f"paths.data={data}",
            f"paths.anchor={data}/anchor",
            f"paths.pool={data}/pool",
            f"paths.inbox={data}/inbox",
            *overrides,
        ]
    )
    started = time.perf_counter()
    summary = write_demo_data(cfg)
    generated = {
        "generate_s": round(time.perf_counter() - started, 1),
        "data": {k: summary[k] for k in ("anchor", "pool", "inbox", "files", "bytes", "changed")},
    }
    log.info("demo data: %s", json.dumps(generated["data"]))
    return cfg, data, generated


def train_base(anchor_yaml: Path, runs: Path, epochs: int = BASE_TRAIN["epochs"]) -> tuple[Path, float]:
    """Train yolov8n from scratch on anchor train/val (BASE_TRAIN) into ``runs/base``; returns
    (best.pt, wall seconds)."""
    from ultralytics import YOLO

    started = time.perf_counter()
    model = YOLO("yolov8n.yaml")
    model.train(
        data=str(anchor_yaml), **{**BASE_TRAIN, "epochs": epochs}, project=str(runs), name="base", exist_ok=True
    )
    return runs / "base" / "weights" / "best.pt", round(time.perf_counter() - started, 1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None, help="work folder (default: a new temp dir)")
    parser.add_argument("--epochs", type=int, default=BASE_TRAIN["epochs"], help="base training epochs")
    parser.add_argument("--base", type=Path, default=None, help="reuse this base best.pt (skip training)")
    parser.add_argument("--finetune", action="store_true", help="also check that a fine-tune fixes it")
    parser.add_argument("--replay", type=int, default=10, help="anchor-train pages per pool-train page")
    parser.add_argument("overrides", nargs="*", help="demo config overrides, e.g. demo.anchor.train=300")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from ultralytics import settings

    settings.update({"mlflow": False})
    from ultralytics import YOLO

    work = (args.workdir or Path(tempfile.mkdtemp(prefix="detloop-learnability-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"workdir": str(work), "overrides": args.overrides}
    _, data, generated = prepare_data(work, args.overrides)
    report.update(generated)

    anchor_yaml = write_yaml(work / "anchor.yaml", data / "anchor", "images/train", "images/val", "images/test")
    runs = work / "runs"
    if args.base:
        best = args.base
    else:
        best, report["base_train_s"] = train_base(anchor_yaml, runs, args.epochs)
    base = YOLO(str(best))
    started = time.perf_counter()
    metrics = base.val(
        data=str(anchor_yaml),
        split="test",
        imgsz=160,
        batch=16,
        device="cpu",
        plots=False,
        project=str(runs),
        name="base-test",
        exist_ok=True,
        verbose=False,
    )
    report["base_anchor_test_map50"] = round(float(metrics.box.map50), 4)
    report["base_anchor_test_map50_per_class"] = per_class_map50(metrics)
    report["val_s"] = round(time.perf_counter() - started, 1)
    failures = [*sorted((data / "pool" / "images").glob("*.jpg")), *sorted((data / "inbox" / "images").glob("*.jpg"))]
    started = time.perf_counter()
    report["base_failure_detection"] = detection_rate(base, failures)
    report["predict_failures_s"] = round(time.perf_counter() - started, 1)
    report["base_anchor_test_detection"] = detection_rate(
        base, sorted((data / "anchor" / "images" / "test").glob("*.jpg"))
    )
    log.info("base: %s", json.dumps(report))

    if args.finetune:
        train_txt, val_txt, holdout = mix_lists(data, work, args.replay)
        ft_yaml = write_yaml(work / "finetune.yaml", work, train_txt.name, val_txt.name)
        report["base_pool_holdout_detection"] = detection_rate(base, holdout)
        started = time.perf_counter()
        tuned = YOLO(str(best))
        tuned.train(data=str(ft_yaml), **FINETUNE_TRAIN, project=str(runs), name="finetune", exist_ok=True)
        report["finetune_train_s"] = round(time.perf_counter() - started, 1)
        report["finetune_train_images"] = len(train_txt.read_text(encoding="utf-8").splitlines())
        tuned = YOLO(str(runs / "finetune" / "weights" / "best.pt"))
        metrics = tuned.val(
            data=str(anchor_yaml),
            split="test",
            imgsz=160,
            batch=16,
            device="cpu",
            plots=False,
            project=str(runs),
            name="finetune-test",
            exist_ok=True,
            verbose=False,
        )
        report["finetune_anchor_test_map50"] = round(float(metrics.box.map50), 4)
        report["finetune_anchor_test_map50_per_class"] = per_class_map50(metrics)
        report["finetune_pool_holdout_detection"] = detection_rate(tuned, holdout)
        report["finetune_inbox_detection"] = detection_rate(tuned, sorted((data / "inbox" / "images").glob("*.jpg")))

    (work / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
