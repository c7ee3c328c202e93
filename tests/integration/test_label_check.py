"""The label check on a real pool with one wrong label: before training (finetune), at the gate (report,
record, MLflow run) and in the FiftyOne App (the saved view, with the project's kind of mongod).

The tiny demo's 1-epoch models find nothing, and a model that finds document fields takes minutes to
train, so these tests bring their own data: coloured squares (red, blue) on 64 px pages, which a base
model learns in about 30 s at 64 px. The pool is built the user's way (``inbox add``, ``review accept``)
and the reviewer's corrected labels give one report the wrong class.
"""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
from PIL import Image
from tests.conftest import tiny_overrides
from tests.integration.conftest import own_mongod

from detloop.base import run as run_base
from detloop.cli.main import main as cli
from detloop.core.config import compose
from detloop.data.anchor import import_anchor
from detloop.data.inbox import add_to_inbox
from detloop.data.manifest import read_manifest, split_for
from detloop.data.review import review
from detloop.evaluation import evaluator
from detloop.finetune import run as run_finetune
from detloop.gate import run as run_gate
from detloop.mix import run as run_mix

pytestmark = [pytest.mark.integration, pytest.mark.slow]

COLOURS = {0: (220, 30, 30), 1: (30, 30, 220)}  # class 0 red, class 1 blue
SIZE = 64
TRAINING = [  # a base that learns the squares: 30 epochs at 64 px, no mosaic (about 30 s on 2 CPU cores)
    "base.train.epochs=30",
    "base.train.lr0=0.02",
    "base.train.warmup_epochs=0.5",
    "+base.train.mosaic=0.0",
    "base.train.val=false",
    "finetune.train.epochs=1",
    "finetune.train.plots=false",
    "gate.new_samples.pass_above=1.0",  # Gate 2 cannot pass: the report's decision review shows the label check
]


def page(rng: np.random.Generator, folder, name: str) -> None:
    """A white page with one red or blue square, and its YOLO label (Ultralytics layout)."""
    pixels = np.full((SIZE, SIZE, 3), 255, np.uint8)
    side, cls = int(rng.integers(16, 26)), int(rng.integers(0, 2))
    x, y = (int(v) for v in rng.integers(0, SIZE - side, 2))
    pixels[y : y + side, x : x + side] = COLOURS[cls]
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(folder / "images" / f"{name}.png")
    xc, yc, w = (x + side / 2) / SIZE, (y + side / 2) / SIZE, side / SIZE
    (folder / "labels" / f"{name}.txt").write_text(f"{cls} {xc:.6f} {yc:.6f} {w:.6f} {w:.6f}\n")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Given a squares anchor, a base (v1) trained on it, 20 reports in the pool of which one, in the holdout,
    was accepted with the wrong class (its square's class flipped by the reviewer's labels), and a forced
    fine-tune (v2). The flipped report is the holdout report whose square the base finds most surely, so the
    test does not depend on how well a 30-second model finds the others."""
    base = tmp_path_factory.mktemp("label-check")
    rng = np.random.default_rng(0)
    source = base / "source"
    for split, n in (("train", 48), ("val", 8), ("test", 8)):
        for i in range(n):
            page(rng, source / split, f"{split}-{i:03d}")
    (source / "data.yaml").write_text(
        "path: .\ntrain: train/images\nval: val/images\ntest: test/images\nnames: {0: red, 1: blue}\n"
    )
    overrides = [*tiny_overrides(base), *TRAINING]
    cfg = compose(overrides)
    import_anchor(source, cfg)
    for i in range(20):
        page(rng, base / "reports", f"report-{i:02d}")
    ids = add_to_inbox(base / "reports" / "images", cfg)["accepted"]
    assert len(ids) == 20
    run_base(cfg)
    holdout = [i for i in ids if split_for(i, dict(cfg.pool.split)) == "holdout"]
    sure = surest(cfg, [base / "data" / "inbox" / "images" / f"{i}.png" for i in holdout])
    wrong, conf = holdout[sure[0]], sure[1]
    assert conf >= 0.6, f"the base finds no holdout square surely (best {conf:.2f}): too weak to check labels with"
    corrected = base / "corrected"
    corrected.mkdir()
    cls, *box = (base / "data" / "inbox" / "labels" / f"{wrong}.txt").read_text().split()
    (corrected / f"{wrong}.txt").write_text(" ".join([str(1 - int(cls)), *box]) + "\n")
    review(cfg, "accept", ids, "qa", labels_dir=corrected)
    forced = compose([*overrides, "trigger.force=true"])
    run_mix(forced)
    run_finetune(forced)
    return base, overrides, wrong


def surest(cfg, images: list) -> tuple[int, float]:
    """(index, confidence) of the image whose labelled square the base (v1) finds with the highest confidence."""
    from detloop.evaluation.metrics import iou_matrix
    from detloop.model.pyfunc import model_weights

    weights, config = model_weights(f"models:/{cfg.mlflow.registered_model}/1", images[0].parent.parent / "v1")
    found = []
    for gt, det in zip(evaluator.load_ground_truth(images), evaluator.predict(weights, images, imgsz=64), strict=True):
        on = (iou_matrix(gt.boxes, det.boxes)[0] >= 0.5) & (det.cls == gt.cls[0])
        found.append(float(det.conf[on].max()) if on.any() else 0.0)
    return int(np.argmax(found)), max(found)


def test_a_wrong_label_is_flagged_first_before_training_and_at_the_gate(project):
    base, overrides, wrong = project
    build = base / "build"
    # then the base model's check before training put the wrong label first, as a likely wrong class
    before = json.loads((build / "finetune" / "label_check.json").read_text())
    assert before["models"] == {"v1": "base, before training"} and before["checked"] == 20
    top = before["flagged"][0]
    assert top["id"] == wrong, [(e["id"], e["score"], e["reasons"]) for e in before["flagged"]]
    assert top["findings"][0]["kind"] == "wrong_class" and "likely wrong class" in top["reasons"][0]
    # when the gate runs (Gate 2 review)
    run_gate(compose(overrides))
    record = json.loads((build / "gate" / "decision.json").read_text())
    assert record["gates"]["new_samples"]["decision"] == "review"
    # then the gate's check (candidate v2 from the gate's own pool predictions, with the base's) agrees
    check = record["label_check"]
    pool = read_manifest(base / "data" / "pool" / "manifest.jsonl")
    assert check["models"] == {"v1": "base, before training", "v2": "candidate"}
    assert check["checked"] == sum(r["split"] in ("train", "holdout") for r in pool)
    first = check["flagged"][0]
    assert (first["id"], first["split"]) == (wrong, "holdout")
    assert set(first["findings"][0]["by"]) == {"v1", "v2"}  # both models contradict the label
    # and the report on the candidate's run shows the section, the sample, the App link and the command
    run_id = record["candidate"]["run_id"]
    report = mlflow.artifacts.load_text(f"runs:/{run_id}/gate/report.md")
    assert "## Label check" in report and f"| 1 | {wrong} | holdout |" in report
    assert "(http://127.0.0.1:5151/datasets/detloop-pool?view=label-check)" in report
    assert "`detloop inspect --set pool --view label-check --model 2 --no-evaluate --app`" in report
    # and the run carries both checks and the flagged ids
    run = mlflow.get_run(run_id)
    assert run.data.tags["label_check.flagged"].split(", ")[0] == wrong
    assert run.data.metrics["label_check/flagged"] == check["flagged_total"]
    logged = mlflow.artifacts.load_dict(f"runs:/{run_id}/label_check/gate.json")
    assert logged["flagged"][0]["id"] == wrong
    assert mlflow.artifacts.load_dict(f"runs:/{run_id}/label_check/base.json")["flagged"][0]["id"] == wrong


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    """A mongod of this module's own (FiftyOne's binary), stopped afterwards."""
    with own_mongod(tmp_path_factory.mktemp("fiftyone-db")) as uri:
        yield uri


def test_the_app_view_shows_the_flagged_samples_in_order(project, database, capsys):
    base, overrides, wrong = project
    ours = [*overrides, f"fiftyone.database.uri={database}"]
    build = base / "build"
    if not (build / "gate" / "decision.json").is_file():  # this test alone: the gate's check comes from the gate
        run_gate(compose(overrides))
    check = json.loads((build / "gate" / "decision.json").read_text())["label_check"]
    # when the user runs the command the report names
    assert cli(["inspect", "--set", "pool", "--view", "label-check", "--no-predictions", "--json", *ours]) == 0
    shown = json.loads(capsys.readouterr().out)["view"]
    # then the pool dataset has the saved view, the flagged samples in the check's order, the wrong one first
    from detloop.fiftyone.db import connect

    fo = connect(compose(ours))
    dataset = fo.load_dataset("detloop-pool")
    assert dataset.has_saved_view("label-check") and shown["url"].endswith("/datasets/detloop-pool?view=label-check")
    view = dataset.load_saved_view("label-check")
    assert view.values("detloop_id") == shown["ids"] == [e["id"] for e in check["flagged"]]
    assert shown["ids"][0] == wrong
    assert view.values("label_check_score") == [e["score"] for e in check["flagged"]]
    assert "likely wrong class" in view.first()["label_check_reason"]
    # and the wrong label is tagged in ground_truth, with the models' box beside it
    (label,) = view.first()["ground_truth"].detections
    assert label.tags == ["label-check"]
    (evidence,) = view.first()["label_check"].detections
    assert (evidence.label, evidence.tags) == ({"red": "blue", "blue": "red"}[label.label], ["wrong_class"])
    # and a second run (a newer check) replaces the marks instead of adding to them
    assert cli(["inspect", "--set", "pool", "--view", "label-check", "--no-predictions", *ours]) == 0
    assert len(dataset.match_tags("label-check")) == len(check["flagged"])
