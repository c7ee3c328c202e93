"""Cost of ordering the inbox by value (``detloop review queue``) per 1,000 inbox images, on the CPU.

    .venv/bin/python benchmarks/review_queue.py [--inbox 1000] [--epochs 5] [--imgsz 160 320] [--weights PATH]

In a temporary folder: the demo data at its default size (280 anchor-train pages, 150 in the pool)
with ``--inbox`` reported failures, and a base model trained with the demo recipe for ``--epochs``
epochs at 160 px (or ``--weights``, a local .pt). Then, per input size, times detloop's own
:func:`detloop.fiftyone.queue.review_queue` twice: **cold** (empty cache: the anchor-train set is
embedded and the pool fingerprinted first) and **warm** (both cached, as every later run of the same
model finds them: only the inbox is predicted and embedded, then scored and ordered). The figure per
1,000 inbox images is the warm run's; the one-time cost of the anchor is reported beside it. Also
checks the order: the inbox's copies of pool pages (``--copies``, re-encoded 5 % brighter with a
little noise) must all be flagged as near-duplicates and no other report.

Prints a JSON record with the machine's load average and peak RSS and writes it to
``build/benchmarks/review_queue.json``.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from shared import load_average, write_report

from detloop.core.config import compose
from detloop.core.env import project_root
from detloop.data.demo import write_demo_data
from detloop.data.inbox import add_to_inbox, report_id
from detloop.data.manifest import read_manifest, sha256_file
from detloop.fiftyone.queue import review_queue


def train(base: Path, overrides: list[str], epochs: int) -> Path:
    """The demo's base recipe for ``epochs`` epochs (MLflow store in the temporary folder); its weights."""
    from detloop.base import run as run_base

    run_base(compose([*overrides, f"base.train.epochs={epochs}"]))
    return sorted(base.glob("build/base/runs/*/weights/best.pt"))[0]


def add_copies(base: Path, cfg, n: int) -> set[str]:
    """``n`` pool pages re-encoded 5 % brighter with a little noise, added to the inbox; their ids."""
    pool = base / "data" / "pool"
    folder = base / "copies"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for row in read_manifest(pool / "manifest.jsonl")[:n]:
        page = np.asarray(Image.open(pool / "images" / f"{row['id']}.jpg").convert("RGB"), dtype=np.int16)
        noisy = np.clip(page * 1.05 + rng.integers(-4, 5, page.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"copy-{row['id']}.jpg", quality=85)
    add_to_inbox(folder, cfg)
    return {report_id(sha256_file(p)) for p in folder.iterdir()}


def measure(cfg, model: dict, copies: set[str]) -> dict:
    """Cold and warm runs of the queue at one input size; seconds per stage and per 1,000 inbox images."""
    shutil.rmtree(Path(str(cfg.inbox.queue.cache)), ignore_errors=True)
    runs = {}
    for kind in ("cold", "warm"):
        started = time.perf_counter()
        result = review_queue(cfg, model)
        runs[kind] = {"wall_s": round(time.perf_counter() - started, 2), "stages_s": result["seconds"]}
    n = result["counts"]["inbox"]
    flagged = {item["id"] for item in result["items"] if item["duplicate_of"]}
    warm = runs["warm"]["wall_s"]
    return {
        "imgsz": model["imgsz"],
        "inbox": n,
        "anchor_train": result["counts"]["anchor_train"],
        "reviewed": result["counts"]["reviewed"],
        **runs,
        "warm_s_per_1000": round(warm * 1000 / n, 2),
        "warm_images_per_s": round(n / warm, 1),
        "one_time_anchor_s": runs["cold"]["stages_s"]["anchor"],
        "copies_flagged": f"{len(flagged & copies)}/{len(copies)}",
        "others_flagged": len(flagged - copies),
        "last_ranks_are_copies": {item["id"] for item in result["items"][-len(copies) :]} == copies,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inbox", type=int, default=1000, help="reported failures in the inbox (copies included)")
    parser.add_argument("--copies", type=int, default=20, help="of them, re-encoded copies of pool pages")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of the base model trained for the run")
    parser.add_argument("--weights", type=Path, help="a local .pt instead of training one")
    parser.add_argument("--imgsz", type=int, nargs="+", default=[160, 320], help="input sizes to measure")
    parser.add_argument("--output", type=Path, default=project_root() / "build" / "benchmarks" / "review_queue.json")
    args = parser.parse_args()
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="detloop-queue-bench-") as tmp:
        base = Path(tmp)
        overrides = [
            f"paths.data={base / 'data'}",
            f"paths.build={base / 'build'}",
            f"mlflow.store_dir={base / 'mlruns'}",
            "mlflow.tracking_uri=null",
            f"demo.failures.inbox={args.inbox - args.copies}",
        ]
        cfg = compose(overrides)
        started = time.perf_counter()
        write_demo_data(cfg)
        copies = add_copies(base, cfg, args.copies)
        setup = {"demo_data_s": round(time.perf_counter() - started, 1)}
        started = time.perf_counter()
        weights = args.weights or train(base, overrides, args.epochs)
        setup["train_s"] = None if args.weights else round(time.perf_counter() - started, 1)
        models = [{"weights": str(weights), "imgsz": size, "label": "bench"} for size in args.imgsz]
        sizes = [measure(cfg, model, copies) for model in models]
    result = {
        "what": "review queue per 1,000 inbox images (CPU): predict + embed + fingerprint the inbox, score, order",
        "threads": torch.get_num_threads(),
        "setup": setup,
        "epochs": None if args.weights else args.epochs,
        "sizes": sizes,
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        "load_average": [load_before, load_average()],
    }
    write_report(args.output, result)
    ok = all(s["copies_flagged"] == f"{len(copies)}/{len(copies)}" and not s["others_flagged"] for s in sizes)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
