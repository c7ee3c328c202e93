"""Forgetting table: what each fine-tuning rule buys on the demo data.

Trains the demo base model (from scratch on anchor, the base stage's settings, via
``demo_learnability``), then fine-tunes it several ways and measures every model the same way:

* anchor-test mAP50 (Ultralytics val at the base image size, with ``conf/evaluate``'s conf and iou):
  what the model still knows;
* pool-holdout detection rate (conf 0.25, IoU 0.5, one-to-one, class-aware; class-agnostic as a
  diagnostic): whether the reported failures are fixed; the holdout is never trained on;
* training wall time.

Runs (every fine-tune is deterministic: seed 0, deterministic, workers 0, cpu):

1. ``base``: from scratch on anchor train/val;
2. ``detloop``: from base on the mix built by ``detloop.mixing.build_mix`` (pool train + replay by the
   ratio table, val = anchor val + pool val) with the ``conf/finetune`` recipe;
3. ``replay-unfrozen``: the same mix, freeze 0 and lr0 0.01;
4. ``naive``: pool train only (val = pool val), the ``conf/finetune`` recipe;
5. ``naive-high-lr``: pool train only, lr0 0.01, freeze 0, Ultralytics' default warmup_bias_lr 0.1;
6. ``chain-1..3``: the pool train samples split into 3 batches in manifest order; each step starts
   from the previous step's best.pt (step 1 from base) and trains on the mix of the pool as it stood
   before the next batch arrived (batches 1..k, their val samples, a fresh replay draw per pool version).

7. ``search`` (with ``--search REPO``): the recipe search's staged trial from a project where `dvc repro`
   ran on the same data (``benchmarks/demo_search.py``'s clone; its base is this base: the same
   deterministic training), read from that project's registry and measured here.

Every model is measured at the input size it was trained at (as the gate does).

    .venv/bin/python benchmarks/forgetting.py --workdir /tmp/detloop-forgetting [--reuse-base]
    .venv/bin/python benchmarks/forgetting.py --workdir W --reuse-base --no-chain --search /tmp/detloop-search/repo \
        demo=strong_shift

Writes ``build/benchmarks/forgetting.json`` and prints the table in markdown.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_learnability import BASE_TRAIN, detection_rate, per_class_map50, prepare_data, train_base, write_yaml  # noqa: E402

from detloop.data import (
    datasets,
    mixing,
    pool,  # noqa: E402
)
from detloop.data.manifest import manifest_hash  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "build" / "benchmarks" / "forgetting.json"
CHAIN_STEPS = 3
UNFROZEN = {"freeze": 0, "lr0": 0.01}
HIGH_LR = {"freeze": 0, "lr0": 0.01, "warmup_bias_lr": 0.1}

log = logging.getLogger("forgetting")


# ----------------------------------------------------------------------------------------------- data
def recipe(cfg: DictConfig, **changes) -> dict:
    """The ``conf/finetune`` recipe as Ultralytics train() arguments, on the CPU, with ``changes``."""
    args = OmegaConf.to_container(cfg.finetune.train, resolve=True)
    return {**args, "device": "cpu", "plots": False, "verbose": False, **changes}


def detloop_mix(cfg: DictConfig) -> dict:
    """The mix exactly as stage ``mix`` builds it for the pool at ``cfg.paths.pool`` (trigger forced)."""
    rows = pool.pool_rows(cfg)
    trigger = pool.TriggerStatus(
        pool_size=len(rows),
        split_counts=pool.split_counts(cfg, rows),
        new_samples=len(rows),
        min_train_samples=int(cfg.trigger.min_train_samples),
        triggered=True,
        reasons=[],
        forced=True,
        message="benchmark",
        new_train_samples=sum(1 for r in rows if r["split"] == "train"),
    )
    return mixing.build_mix(cfg, trigger)


def naive_mix(cfg: DictConfig) -> dict:
    """Pool train only, pool val only: no replay, no anchor val."""
    train, val = pool.pool_samples(cfg, "train"), pool.pool_samples(cfg, "val")
    return {
        "record": {"new_train": len(train), "new_val": len(val), "old_train": 0, "anchor_val": 0},
        "train": train,
        "val": val,
    }


def pool_versions(cfg: DictConfig, folder: Path, steps: int = CHAIN_STEPS) -> list[DictConfig]:
    """Configs for the pool as it stood after each of ``steps`` batches of pool-train samples.

    The train samples are split into ``steps`` batches in manifest order; version k holds every
    manifest row before the first train sample of batch k + 1 (the last version is the whole pool,
    byte for byte, so its replay draw is stage ``mix``'s).
    """
    source = pool.pool_rows(cfg)
    pool_dir = Path(str(cfg.paths.pool))
    lines = [
        ln for ln in (pool_dir / pool.MANIFEST).read_text(encoding="utf-8").splitlines(keepends=True) if ln.strip()
    ]
    train_rows = [i for i, row in enumerate(source) if row["split"] == "train"]
    batches = np.array_split(np.array(train_rows), steps)
    versions = []
    for k in range(steps):
        end = int(batches[k + 1][0]) if k + 1 < steps else len(source)
        target = folder / f"pool-{k + 1}"
        if target.exists():
            shutil.rmtree(target)
        (target / "images").mkdir(parents=True)
        (target / "labels").mkdir()
        (target / pool.MANIFEST).write_text("".join(lines[:end]), encoding="utf-8")
        for row in source[:end]:
            for sub in ("images", "labels"):
                for path in (pool_dir / sub).glob(f"{row['id']}.*"):
                    shutil.copy2(path, target / sub / path.name)
        version = cfg.copy()
        version.paths.pool = str(target)
        pool.check_reviewed(version)
        versions.append(version)
    return versions


def write_lists(folder: Path, mixed: dict) -> Path:
    """train.txt / val.txt with absolute image paths, and the data yaml over them."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        (folder / f"{split}.txt").write_text("".join(f"{Path(p).resolve()}\n" for p in mixed[split]), encoding="utf-8")
    return write_yaml(folder / "data.yaml", folder, "train.txt", "val.txt")


# ------------------------------------------------------------------------------------------ measuring
def measure(weights: Path, cfg: DictConfig, anchor_yaml: Path, holdout: list[Path], project: Path, name: str) -> dict:
    from ultralytics import YOLO

    model = YOLO(str(weights))
    # at the input size the model was trained at (what the gate uses); the base's for base and default recipes
    ev, imgsz = cfg.evaluate, int(model.overrides.get("imgsz") or cfg.base.train.imgsz)
    metrics = model.val(
        data=str(anchor_yaml),
        split=ev.split,
        imgsz=imgsz,
        batch=ev.batch,
        conf=ev.conf,
        iou=ev.iou,
        device="cpu",
        plots=False,
        project=str(project),
        name=f"{name}-test",
        exist_ok=True,
        verbose=False,
    )
    aware = detection_rate(model, holdout, imgsz)
    agnostic = detection_rate(model, holdout, imgsz, class_aware=False)
    return {
        "anchor_test_map50": round(float(metrics.box.map50), 4),
        "anchor_test_map50_95": round(float(metrics.box.map), 4),
        "anchor_test_map50_per_class": per_class_map50(metrics),
        "holdout_detection": aware["overall"],
        "holdout_detection_per_class": aware["per_class"],
        "holdout_detection_ignoring_class": agnostic["overall"],
        "holdout_objects": aware["objects"],
        "holdout_images": aware["images"],
        "imgsz": imgsz,
    }


def search_row(repo: Path, cfg: DictConfig, anchor_yaml: Path, holdout: list[Path], runs: Path) -> dict | None:
    """The recipe search's staged trial of ``repo`` (a project where `dvc repro` ran on the same data, e.g.
    ``benchmarks/demo_search.py``'s clone), its weights read from that project's registry and measured here."""
    import mlflow

    from detloop.model.pyfunc import model_weights

    result = json.loads((repo / "build" / "search" / "result.json").read_text(encoding="utf-8"))
    if not result.get("searched"):
        log.info("search: %s", result.get("why"))
        return None
    staged = result.get("staged")
    if not staged:
        log.info("search: no trial passed every gate")
        return None
    store = repo / "mlruns" / "mlflow.db"
    mlflow.set_tracking_uri(f"sqlite:///{store}")
    mlflow.set_registry_uri(f"sqlite:///{store}")
    weights, _ = model_weights(f"models:/{cfg.mlflow.registered_model}/{staged['version']}", runs / "search-staged")
    trial = next(t for t in result["trials"] if t["version"] == staged["version"])
    recipe = ", ".join(
        f"{k.split('.')[-1]} {v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]} {v}"
        for k, v in trial["recipe"].items()
        if v is not None and k != "finetune.replay.pool_repeat"
    )
    return {
        "key": "search",
        "label": f"recipe search: best of {result['trials_run']} trials (staged v{staged['version']})",
        "start": "base",
        "train_pages": "see recipe",
        "val_pages": "-",
        "recipe_note": recipe,
        "train_s": None,
        "search": {"parent_run_id": result["parent_run_id"], "passing": result["passing"], "trial": trial},
        **measure(weights, cfg, anchor_yaml, holdout, runs, "search"),
    }


def finetune(start: Path, data_yaml: Path, args: dict, runs: Path, name: str) -> tuple[Path, float]:
    from ultralytics import YOLO

    started = time.perf_counter()
    model = YOLO(str(start))
    model.train(data=str(data_yaml), **args, project=str(runs), name=name, exist_ok=True)
    return runs / name / "weights" / "best.pt", round(time.perf_counter() - started, 1)


# -------------------------------------------------------------------------------------------- report
def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def markdown(rows: list[dict]) -> str:
    base = rows[0]["anchor_test_map50"]
    out = [
        "| run | starts from | train pages (pool + anchor replay) | val pages | recipe | anchor-test mAP50 | "
        "pool-holdout detection | ignoring class | training wall time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        delta = row["anchor_test_map50"] - base
        change = "" if row["key"] == "base" else f" ({delta * 100:+.1f})"
        out.append(
            f"| {row['label']} | {row['start']} | {row['train_pages']} | {row['val_pages']} | {row['recipe_note']} | "
            f"{row['anchor_test_map50']:.3f}{change} | {row['holdout_detection']:.3f} | "
            f"{row['holdout_detection_ignoring_class']:.3f} | {fmt_time(row['train_s'])} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="work folder (data, base weights, runs)")
    parser.add_argument("--reuse-base", action="store_true", help="reuse WORKDIR/runs/base (skip training the base)")
    parser.add_argument(
        "--reuse-finetunes",
        action="store_true",
        help="reuse fine-tunes that finished in WORKDIR before (their run.json)",
    )
    parser.add_argument("--base-epochs", type=int, default=BASE_TRAIN["epochs"], help="base training epochs")
    parser.add_argument("--epochs", type=int, default=None, help="fine-tune epochs (default: conf/finetune's)")
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"JSON report (default: {OUTPUT})")
    parser.add_argument(
        "--search",
        type=Path,
        default=None,
        help="a project where `dvc repro` ran on the same data (benchmarks/demo_search.py's clone): its recipe "
        "search's staged trial becomes a row",
    )
    parser.add_argument("--no-chain", action="store_true", help="skip the chained fine-tunes")
    parser.add_argument("overrides", nargs="*", help="demo config overrides, e.g. demo.anchor.train=300")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from ultralytics import settings

    settings.update({"mlflow": False})

    started_all = time.perf_counter()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    cfg, data, generated = prepare_data(work, args.overrides)
    if args.epochs is not None:
        cfg.finetune.train.epochs = args.epochs
    anchor_yaml = write_yaml(work / "anchor.yaml", data / "anchor", "images/train", "images/val", "images/test")
    runs = work / "runs"
    holdout = pool.pool_samples(cfg, "holdout")

    base_record = work / "base.json"
    best = runs / "base" / "weights" / "best.pt"
    if args.reuse_base:
        if not (best.is_file() and base_record.is_file()):
            parser.error(f"--reuse-base: {best} or {base_record} is missing; run once without it")
        base_s = json.loads(base_record.read_text(encoding="utf-8"))["train_s"]
        log.info("reusing the base %s (trained in %.0f s)", best, base_s)
    else:
        best, base_s = train_base(anchor_yaml, runs, args.base_epochs)
        base_record.write_text(json.dumps({"train_s": base_s, "weights": str(best)}) + "\n", encoding="utf-8")
    n_anchor_train = len(datasets.anchor_images(data / "anchor", "train"))
    n_anchor_val = len(datasets.anchor_images(data / "anchor", "val"))
    rows = [
        {
            "key": "base",
            "label": "base",
            "start": "scratch",
            "train_pages": f"{n_anchor_train} anchor",
            "val_pages": n_anchor_val,
            "recipe_note": f"base stage: {args.base_epochs} epochs, lr0 {BASE_TRAIN['lr0']}",
            "train_s": base_s,
            "reused": args.reuse_base,
            **measure(best, cfg, anchor_yaml, holdout, runs, "base"),
        }
    ]
    log.info("base: %s", json.dumps(rows[0]))

    default_mix, only_pool = detloop_mix(cfg), naive_mix(cfg)
    plan = [
        ("detloop", "detloop fine-tune (replay mix, default recipe)", "base", default_mix, recipe(cfg), "default"),
        (
            "replay-unfrozen",
            "replay mix, backbone unfrozen",
            "base",
            default_mix,
            recipe(cfg, **UNFROZEN),
            "freeze 0, lr0 0.01",
        ),
        ("naive", "naive: pool only, default recipe", "base", only_pool, recipe(cfg), "default"),
        (
            "naive-high-lr",
            "naive: pool only, high lr",
            "base",
            only_pool,
            recipe(cfg, **HIGH_LR),
            "freeze 0, lr0 0.01, warmup_bias_lr 0.1",
        ),
    ]
    for k, version in enumerate([] if args.no_chain else pool_versions(cfg, work / "chain"), start=1):
        plan.append(
            (
                f"chain-{k}",
                f"chain {k}: batches 1–{k} + replay" if k > 1 else "chain 1: batch 1 + replay",
                "base" if k == 1 else f"chain-{k - 1}",
                detloop_mix(version),
                recipe(cfg),
                "default",
            )
        )

    weights = {"base": best}
    for key, label, start, mixed, train_args, note in plan:
        record = mixed["record"]
        data_yaml = write_lists(work / "lists" / key, mixed)
        done = work / "runs" / key / "run.json"
        if args.reuse_finetunes and done.is_file():
            train_s = json.loads(done.read_text(encoding="utf-8"))["train_s"]
            weights[key] = runs / key / "weights" / "best.pt"
            log.info("%s: reusing %s", key, weights[key])
        else:
            log.info("%s: %d train pages, %d val pages, from %s", key, len(mixed["train"]), len(mixed["val"]), start)
            weights[key], train_s = finetune(weights[start], data_yaml, train_args, runs, key)
            done.write_text(json.dumps({"train_s": train_s}) + "\n", encoding="utf-8")
        row = {
            "key": key,
            "label": label,
            "start": start,
            "train_pages": f"{record['new_train']} + {record['old_train']}",
            "val_pages": len(mixed["val"]),
            "recipe_note": note,
            "train_s": train_s,
            "mix": {k: v for k, v in record.items() if k not in ("trigger", "trigger_reasons")},
            "train_args": {
                k: train_args[k]
                for k in ("epochs", "lr0", "freeze", "warmup_epochs", "warmup_bias_lr", "cos_lr", "optimizer")
            },
            **measure(weights[key], cfg, anchor_yaml, holdout, runs, key),
        }
        rows.append(row)
        log.info("%s: %s", key, json.dumps(row))

    if args.search is not None:
        row = search_row(args.search.resolve(), cfg, anchor_yaml, holdout, runs)
        if row is not None:
            rows.insert(2, row)  # after base and the guide's recipe
            log.info("search: %s", json.dumps(row))

    report = {
        "workdir": str(work),
        "overrides": args.overrides,
        "pool": {"manifest_sha256": manifest_hash(data / "pool" / pool.MANIFEST), **pool.split_counts(cfg)},
        "data": generated["data"],
        "holdout_images": len(holdout),
        "evaluate": {
            "split": cfg.evaluate.split,
            "imgsz": int(cfg.base.train.imgsz),
            "conf": cfg.evaluate.conf,
            "iou": cfg.evaluate.iou,
            "detection_conf": 0.25,
            "detection_iou": 0.5,
        },
        "rows": rows,
        "total_s": round(time.perf_counter() - started_all, 1),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(markdown(rows))
    print(f"\nreport: {args.output}")
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
