"""The README's "Bring your own anchor dataset" path on a fresh clone, at tiny size.

A newcomer clones the repository, imports a dataset of their own (other classes than the demo's),
records the data version and runs the pipeline: `detloop anchor import PATH`, `dvc add data`,
`dvc repro`. With no reported failures yet the loop must end cleanly: the base is trained and
registered, the mix waits (0/50), nothing is fine-tuned or retrained, and `dvc metrics show` loads
every metrics file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml
from PIL import Image, ImageDraw
from tests.e2e.test_pipeline import copy_working_tree, git, sh, versions

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NAMES = ["box", "disc"]
SPLITS = {"train": 8, "val": 4, "test": 4}


def make_dataset(folder: Path, seed: int = 0) -> Path:
    """A small Ultralytics-format dataset: 96 px pages with a box and a disc each; one background image."""
    rng = random.Random(seed)
    for split, count in SPLITS.items():
        (folder / "images" / split).mkdir(parents=True)
        (folder / "labels" / split).mkdir(parents=True)
        for index in range(count):
            image = Image.new("RGB", (96, 96), (rng.randrange(200, 256),) * 3)
            draw = ImageDraw.Draw(image)
            draw.line([(rng.randrange(96), rng.randrange(96)) for _ in range(3)], fill=(90, 90, 90), width=2)
            lines = []
            for cls in range(len(NAMES)) if index else ():  # image 0 of each split: background
                w, h = rng.randrange(16, 40), rng.randrange(16, 40)
                x, y = rng.randrange(0, 96 - w), rng.randrange(0, 96 - h)
                shape = draw.rectangle if cls == 0 else draw.ellipse
                shape((x, y, x + w, y + h), fill=tuple(rng.randrange(0, 120) for _ in range(3)))
                lines.append(f"{cls} {(x + w / 2) / 96:.6f} {(y + h / 2) / 96:.6f} {w / 96:.6f} {h / 96:.6f}\n")
            image.save(folder / "images" / split / f"{split}_{index:02d}.jpg", quality=90)
            if lines:
                (folder / "labels" / split / f"{split}_{index:02d}.txt").write_text("".join(lines))
    data = {"path": ".", **{split: f"images/{split}" for split in SPLITS}, "names": NAMES}
    (folder / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return folder


@pytest.fixture
def clone(tmp_path) -> Path:
    """A fresh clone of the repository (its working tree, committed in a copy): no data/, no store."""
    origin = copy_working_tree(tmp_path / "origin")
    git(origin, "init", "-q", "-b", "main")
    git(origin, "add", "-A")
    git(origin, "commit", "-q", "-m", "tiny copy")
    git(tmp_path, "clone", "-q", str(origin), "clone")
    return tmp_path / "clone"


def tracked_files(repo: Path) -> set[str]:
    """The files data.dvc records (the .dir listing in the DVC cache)."""
    md5 = yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]
    listing = repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
    return {row["relpath"] for row in json.loads(listing.read_text())}


def test_bring_your_own_anchor_on_a_fresh_clone_runs_the_pipeline_and_waits(clone, tmp_path):
    # given a fresh clone and a dataset of the user's own, outside the project
    dataset = make_dataset(tmp_path / "datasets" / "shapes")
    assert not (clone / "data").exists()
    # when the README's commands run: import the anchor, record the data version, run the pipeline
    sh(clone, "detloop", "anchor", "import", str(dataset / "data.yaml"))
    sh(clone, "dvc", "add", "data")
    out = sh(clone, "dvc", "repro").stdout
    # then the base is trained on it and registered (base and production on the first run)
    assert "Running stage 'base'" in out
    rows = versions(clone)
    assert len(rows) == 1 and rows[0]["aliases"] == ["base", "production"]
    # and with no reported failures yet the loop waits: nothing fine-tuned, retrained or gated
    mix = json.loads((clone / "build" / "mix" / "mix.json").read_text())
    assert mix["trigger"] == "waiting: 0/50 new train samples" and mix["pool_size"] == 0
    for stage in ("finetune", "retrain"):
        assert json.loads((clone / "build" / stage / "model.json").read_text())["skipped"]
    assert json.loads((clone / "build" / "gate" / "decision.json").read_text())["skipped"]
    # and the empty pool and inbox are part of the recorded data version (a checkout restores them)
    assert {"pool/manifest.jsonl", "inbox/manifest.jsonl", "anchor/data.yaml"} <= tracked_files(clone)
    # and `dvc metrics show` loads every metrics file, including the skipped stages'
    shown = sh(clone, "dvc", "metrics", "show")
    assert "failed to load" not in shown.stdout + shown.stderr
    assert "build/retrain/metrics.json" in shown.stdout and "build/finetune/metrics.json" in shown.stdout
