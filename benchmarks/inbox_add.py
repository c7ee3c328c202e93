"""Throughput of ``detloop inbox add`` (and of ``detloop review accept --all`` on the same batch).

Generates N small noise JPEGs (half with proposed labels) in a temporary folder beside a tiny demo
data set, then times ``add_to_inbox`` on a fresh inbox, again on the same batch (every image is then
refused as a duplicate: the cost of hashing and refusing), and ``review`` accepting every sample.

    .venv/bin/python benchmarks/inbox_add.py [--n 1000] [--width 128 --height 96]
"""

from __future__ import annotations

import argparse
import logging
import random
import tempfile
import time
from pathlib import Path

from PIL import Image

import detloop  # noqa: F401  (offline environment)
from detloop.core.config import compose, resolve_path
from detloop.data.demo import write_demo_data
from detloop.data.inbox import add_to_inbox
from detloop.data.manifest import read_manifest
from detloop.data.review import review

BOX = "0 0.5 0.5 0.25 0.25\n"


def make_batch(folder: Path, n: int, size: tuple[int, int]) -> None:
    """``n`` distinct noise JPEGs under images/, every second one with a label under labels/."""
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    rng = random.Random(0)
    for i in range(n):
        Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3)).save(folder / f"images/r{i:05d}.jpg")
        if i % 2 == 0:
            (folder / f"labels/r{i:05d}.txt").write_text(BOX)


def timed(label: str, n: int, fn) -> object:
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    print(f"{label:<44} {n:>6} images  {seconds:7.2f} s  {n / seconds:8.0f} images/s")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="images in the batch")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--height", type=int, default=96)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="detloop-inbox-bench-") as tmp:
        base = Path(tmp)
        cfg = compose(["experiment=tiny", f"paths.data={base / 'data'}", f"paths.build={base / 'build'}"])
        write_demo_data(cfg)
        make_batch(base / "batch", args.n, (args.width, args.height))
        print(
            f"batch: {args.n} JPEGs of {args.width}x{args.height} px, "
            f"{sum(p.stat().st_size for p in (base / 'batch/images').iterdir()) / 1e6:.1f} MB"
        )
        result = timed("inbox add (all accepted)", args.n, lambda: add_to_inbox(base / "batch", cfg))
        assert result["counts"]["accepted"] == args.n, result["refused"][:3]
        result = timed("inbox add again (all refused as duplicates)", args.n, lambda: add_to_inbox(base / "batch", cfg))
        assert result["counts"]["refused"] == args.n
        ids = labelled_ids(cfg)
        timed("review accept (labelled half)", len(ids), lambda: review(cfg, "accept", ids, "bench"))


def labelled_ids(cfg) -> list[str]:
    """Inbox samples with proposed labels (the only ones that can be accepted without corrections)."""
    return [r["id"] for r in read_manifest(resolve_path(cfg, "inbox") / "manifest.jsonl") if r.get("has_labels", True)]


if __name__ == "__main__":
    main()
