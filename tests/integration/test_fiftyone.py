"""FiftyOne with the real bundled MongoDB: load -> evaluate -> review in the App -> commit, and curation.

Each module run starts its own mongod (FiftyOne's binary) on a free port with a private dbpath and
stops it afterwards: a FiftyOne process would otherwise join any FiftyOne database already running
on the machine. FiftyOne runs in this process beside MLflow (the ``detloop`` commands and the steps
in ``fiftyone_checks``), except where a separate process is the point: ``detloop inspect --json``'s
stdout, the App server of ``detloop review open --app`` and a commit killed midway.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from tests.conftest import ROOT, tiny_overrides
from tests.integration.fiftyone_checks import STEPS, synthetic_predictions
from tests.serving_helpers import detector_weights

from detloop.base import run as run_base
from detloop.cli.main import main as cli
from detloop.core.config import compose
from detloop.core.env import free_port
from detloop.data.datasets import anchor_names
from detloop.data.inbox import add_to_inbox
from detloop.data.manifest import read_manifest, sha256_file
from detloop.data.yolo_format import label_path_for
from detloop.evaluation import evaluator, gating
from detloop.fiftyone.db import Mongod, connect, start_mongod, stop_mongod
from detloop.fiftyone.inspection import inspect_sets
from detloop.model.pyfunc import model_weights

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class Database:
    """The test's own mongod; ``kill_and_restart`` SIGKILLs it and starts it again on the same files."""

    def __init__(self, dbpath: Path):
        self.dbpath = dbpath
        self.server: Mongod = start_mongod(dbpath, detach=False)

    @property
    def uri(self) -> str:
        return self.server.uri

    def kill_and_restart(self) -> None:
        os.kill(self.server.pid, signal.SIGKILL)
        os.waitpid(self.server.pid, 0)
        self.server = start_mongod(self.dbpath, self.server.port, detach=False)


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    before = os.environ.get("FIFTYONE_DATABASE_URI")  # connect() exports the URI for the App server
    db = Database(tmp_path_factory.mktemp("fiftyone-db"))
    yield db
    stop_mongod(db.server)
    if before is None:
        os.environ.pop("FIFTYONE_DATABASE_URI", None)
    else:
        os.environ["FIFTYONE_DATABASE_URI"] = before


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_data, database):
    """A tiny project with a trained and registered base model (v1: base, production)."""
    base = tmp_path_factory.mktemp("fiftyone")
    shutil.copytree(tiny_data, base / "data")
    overrides = tiny_overrides(base)
    run_base(compose(overrides))
    return base, overrides


def copy_project(project, database, tmp_path: Path) -> list[str]:
    """Overrides for a private data copy (plus one report without labels) that shares the registry."""
    base, overrides = project
    shutil.copytree(base / "data", tmp_path / "data")
    ours = [
        *(o for o in overrides if not o.startswith("paths.data=")),
        f"paths.data={tmp_path / 'data'}",
        f"fiftyone.database.uri={database.uri}",
        f"fiftyone.dataset_prefix=t{uuid.uuid4().hex[:8]}",
    ]
    report = tmp_path / "report" / "unlabelled.jpg"
    report.parent.mkdir()
    page = np.array(Image.open(sorted((base / "data/anchor/images/train").glob("*.jpg"))[0]))
    page[:8, :8] = 0  # new bytes: not a copy of an anchor image
    Image.fromarray(page).save(report, quality=90)
    assert add_to_inbox(report, compose(ours))["counts"]["accepted"] == 1
    return ours


def checks(*steps: tuple[str, dict]) -> list[dict]:
    """Run FiftyOne steps of ``fiftyone_checks`` one after the other on the test's database; their facts."""
    connect(compose(steps[0][1]["overrides"]))
    return [STEPS[name](args) for name, args in steps]


def check(step: str, **args) -> dict:
    """Run one FiftyOne step of ``fiftyone_checks``; return its facts."""
    return checks((step, args))[0]


def run_detloop(*args: str) -> subprocess.CompletedProcess:
    """The ``detloop`` command in a process of its own (its stdout and stderr apart)."""
    command = [sys.executable, "-m", "detloop.cli.main", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_inspect_loads_sets_and_its_map_is_the_gates(project, database, tmp_path, capsys):
    overrides = copy_project(project, database, tmp_path)
    cfg = compose(overrides)
    prefix = cfg.fiftyone.dataset_prefix
    names = anchor_names(tmp_path / "data/anchor")
    # (the tiny base is barely trained; a detector with confident boxes of one class shows what is stored)
    hot = detector_weights(tmp_path / "hot.pt", [names[k] for k in sorted(names)], hot_class=0)
    # when detloop inspect loads anchor test, pool and inbox with the production model's predictions
    args = ["inspect", "--set", "anchor-test", "--set", "pool", "--set", "inbox", "--json"]
    done = run_detloop(*args, "--model", "1", "--model", str(hot), *overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    # then stdout is the JSON alone; the figures and the classification report went to stderr
    first = json.loads(done.stdout)
    assert f"{prefix}-anchor-test predictions_v1 (v1): mAP50 " in done.stderr
    assert "classification report at confidence >= " in done.stderr and "f1-score" in done.stderr
    # again, by alias: the same field, brought up to date, nothing duplicated
    assert cli([*args, "--model", "production", "--no-evaluate", *overrides]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["datasets"][f"{prefix}-inbox"]["fields"] == ["predictions_v1"]
    assert {k: v["samples"] for k, v in first["datasets"].items()} == {
        k: v["samples"] for k, v in result["datasets"].items()
    }
    assert first["database_uri"] == result["database_uri"] == database.uri
    datasets = result["datasets"]
    assert datasets[f"{prefix}-anchor-test"]["samples"] == 8
    assert datasets[f"{prefix}-pool"]["samples"] == len(read_manifest(tmp_path / "data/pool/manifest.jsonl")) == 12
    assert datasets[f"{prefix}-inbox"]["samples"] == 5
    facts, pool = checks(
        ("dataset_facts", {"overrides": overrides, "dataset": f"{prefix}-anchor-test"}),
        ("dataset_facts", {"overrides": overrides, "dataset": f"{prefix}-pool"}),
    )
    assert facts["persistent"] and facts["samples"] == 8 and "predictions_v1" in facts["fields"]
    gt_objects = sum(
        len(evaluator.load_ground_truth([p])[0].cls)
        for p in sorted((tmp_path / "data/anchor/images/test").glob("*.jpg"))
    )
    assert facts["labels"]["ground_truth"] == gt_objects
    assert pool["tags"].keys() <= {"train", "val", "holdout"} and sum(pool["tags"].values()) == 12
    # and its figures are the gate's evaluator's on the same models and images, digit for digit
    images = sorted((tmp_path / "data/anchor/images/test").glob("*.jpg"))
    weights, config = model_weights(f"models:/{cfg.mlflow.registered_model}/1", tmp_path / "weights")
    models = {"predictions_v1": (weights, int(config["imgsz"])), "predictions_hot": (hot, 640)}
    for field, (path, imgsz) in models.items():
        figures = first["datasets"][f"{prefix}-anchor-test"]["figures"][field]
        measured = gating.measure(cfg, path, imgsz, images, names)
        assert (figures["map50"], figures["map50_95"]) == (measured["map50"], measured["map50_95"]), field
        assert figures["per_class_ap50"] == measured["ap50"] and len(figures["report"]) >= 3
    assert first["datasets"][f"{prefix}-anchor-test"]["figures"]["predictions_v1"]["eval_key"] == "eval_v1"
    # and the dataset holds exactly the pass's boxes at or above the serving confidence, matched per sample
    # (every labelled object is a TP or an FN of its model's eval key; every stored box a TP or an FP)
    serving, stored = float(cfg.gate.new_samples.conf), {}
    settings = {k: cfg.evaluate[k] for k in ("batch", "conf", "iou", "max_det", "device")}
    for field, (path, imgsz) in models.items():
        full = evaluator.predict(path, images, imgsz=imgsz, **settings)
        stored[field] = (sum(int((d.conf >= serving).sum()) for d in full), sum(len(d.conf) for d in full))
        assert facts["labels"][field] == stored[field][0], field
    assert stored["predictions_v1"][0] < stored["predictions_v1"][1]  # the weak boxes of the tiny base: left out
    assert stored["predictions_hot"][0] > 0 and facts["min_confidence"]["predictions_hot"] >= serving
    sums = facts["eval_sums"]
    for key, field in (("eval_v1", "predictions_v1"), ("eval_hot", "predictions_hot")):
        assert sums[f"{key}_tp"] + sums[f"{key}_fn"] == gt_objects
        assert sums[f"{key}_tp"] + sums[f"{key}_fp"] == stored[field][0]


def test_masks_map_equality_views_and_version_compare(project, database, tmp_path):
    overrides = copy_project(project, database, tmp_path)
    import torch

    from detloop.model.yolo import ultralytics

    seg = tmp_path / "yolov8n-seg-untrained.pt"
    torch.manual_seed(0)  # the untrained network's boxes depend on its random initialisation: fixed here
    model = ultralytics().YOLO("yolov8n-seg.yaml")
    for branch in model.model.model[-1].cv3:  # class scores 0.5 instead of ~1e-5: detections and masks to convert
        branch[-1].bias.data.fill_(0.0)
    model.save(str(seg))
    ours = [*overrides, "evaluate.max_det=5"]
    cfg = compose(ours)
    connect(cfg)
    inspect_sets(cfg, ["anchor-test"], [{"weights": str(seg), "imgsz": 64, "label": "seg"}], evaluate=False)
    prefix = cfg.fiftyone.dataset_prefix
    zoo_dir, coco_dir = write_coco(tmp_path / "zoo" / "coco-2017" / "validation", 3), write_coco(tmp_path / "coco", 2)
    # the FiftyOne steps: the stored masks; synthetic predictions stored and evaluated; base vs
    # candidate; curation (class test set, zoo + COCO merged, split, export)
    stored, facts, found, _, cur = checks(
        ("dataset_facts", {"overrides": ours, "dataset": f"{prefix}-anchor-test"}),
        ("store_synthetic", {"overrides": overrides, "seed": 3}),
        (
            "compare_fields",
            {
                "overrides": overrides,
                "dataset": f"{prefix}-anchor-test",
                "base": "predictions_yolov8n_seg_untrained",
                "candidate": "predictions_synthetic",
            },
        ),
        ("write_zoo_info", {"overrides": overrides, "dir": str(zoo_dir.parent), "n": 3}),
        (
            "curate_flow",
            {
                "overrides": overrides,
                "pred_field": "predictions_synthetic",
                "zoo_dir": str(tmp_path / "zoo"),
                "coco_dir": str(coco_dir),
                "export_dir": str(tmp_path / "export"),
            },
        ),
    )
    masks = stored["masks"]
    assert masks["detections"] == 40 and masks["with_mask"] == 40 and masks["shape_matches_box"] == 40
    # given predictions with a mAP well inside (0, 1), stored in FiftyOne and evaluated there
    paths = [Path(p) for p in facts["paths"]]
    names = anchor_names(tmp_path / "data/anchor")
    expected = evaluator.coco_map(evaluator.load_ground_truth(paths), synthetic_predictions(paths, 3), names)
    # then FiftyOne's COCO figures are the gate evaluator's
    assert 0.2 < expected["map50_95"] < expected["map50"] < 0.99
    assert facts["figures"]["map50"] == pytest.approx(expected["map50"], abs=5e-4)
    assert facts["figures"]["map50_95"] == pytest.approx(expected["map50_95"], abs=5e-4)
    per_class = {names[c]: v["ap50"] for c, v in expected["per_class"].items() if v["n_gt"]}
    assert facts["figures"]["per_class_ap50"] == pytest.approx(per_class, abs=5e-4)
    # and the views: FN-sorted samples, the patches of one class, the top-3 class report
    assert facts["fn_sorted"] == sorted(facts["fn_sorted"], reverse=True) and facts["fn_sorted"][0] > 0
    assert facts["patches"] >= facts["table_objects"] and set(facts["patch_labels"]) <= {"tp", "fp", "fn"}
    assert len([k for k in facts["report"] if "avg" not in k]) == 3
    # the report at the serving confidence equals FiftyOne evaluating only the confident predictions
    at_conf, direct = facts["report_at_conf"], facts["report_confident_only"]
    assert at_conf != facts["report"]
    for name in (k for k in direct if "avg" not in k):
        assert at_conf[name] == pytest.approx(direct[name], abs=1e-9), name
    # and base vs candidate side by side: two fields, two eval keys, the difference
    assert {"eval_yolov8n_seg_untrained", "eval_synthetic"} <= set(found["evaluations"])
    assert found["map50_change"] == pytest.approx(found["candidate"]["map50"] - found["base"]["map50"])
    assert found["candidate"]["map50"] > found["base"]["map50"] and found["better"] > 0
    # and curation: class test set, zoo + COCO sources merged with a label map, seeded split, export
    assert cur["test_samples"] == cur["anchor_with_table"] > 0 and cur["test_labels"] == ["table"]
    assert set(cur["test_pred_labels"]) <= {"table"}
    assert cur["zoo_labels"] == {"Table": 3} and cur["merged"] == cur["anchor_with_table"] + 3 + 2
    assert set(cur["merged_labels"]) == {"table"}  # "Table" mapped, other classes dropped
    assert cur["split"] == cur["split_again"] and cur["same_split"] and sum(cur["split"].values()) == cur["merged"]
    exported = Path(cur["yaml"]).parent
    for split, count in cur["split"].items():
        images = sorted((exported / "images" / split).glob("*"))
        assert len(images) == count and all(label_path_for(p).is_file() for p in images)
        assert all(line.split()[0] == "0" for p in images for line in label_path_for(p).read_text().splitlines())
    assert "table" in Path(cur["yaml"]).read_text()


def write_coco(folder: Path, n: int) -> Path:
    """A COCO-format folder (``data/`` + ``labels.json``) of ``n`` images with one ``Table`` box each."""
    (folder / "data").mkdir(parents=True)
    images, annotations = [], []
    for i in range(n):
        Image.new("RGB", (64, 48), (40 * i, 120, 200)).save(folder / "data" / f"{folder.name}{i:04d}.jpg")
        images.append({"id": i + 1, "file_name": f"{folder.name}{i:04d}.jpg", "width": 64, "height": 48})
        annotations.append(
            {"id": i + 1, "image_id": i + 1, "category_id": 7, "bbox": [4, 4, 20, 10], "area": 200, "iscrowd": 0}
        )
    categories = [{"id": 7, "name": "Table", "supercategory": "furniture"}, {"id": 1, "name": "person"}]
    (folder / "labels.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return folder


def _inbox_ids(data: Path) -> list[str]:
    return [row["id"] for row in read_manifest(data / "inbox/manifest.jsonl")]


class Review:
    """The inbox open for review in the App, tagged the way a reviewer does it there."""

    def __init__(self, data: Path, overrides: list[str], dataset: str, ids: list[str], url: str, before: dict):
        self.data, self.overrides, self.dataset, self.ids = data, overrides, dataset, ids
        self.url, self.before = url, before


@pytest.fixture(scope="module")
def review(project, database, tmp_path_factory):
    """``detloop review open --app`` (the production model's predictions as proposed labels) serving the
    inbox; then, in the App, a and b are tagged verified (a: its first box tagged wrong, b: labels
    edited) and c rejected with a reason. The App stays up until the module's tests are done; the
    tests using it read first (the App) and commit last."""
    tmp_path = tmp_path_factory.mktemp("review")
    port = free_port()
    ours = [*copy_project(project, database, tmp_path), f"fiftyone.app.port={port}"]
    cfg = compose(ours)
    # a session of its own: stopping its group also stops the App server it starts
    app = subprocess.Popen(
        [sys.executable, "-m", "detloop.cli.main", "review", "open", "--app", *ours], cwd=ROOT, start_new_session=True
    )
    dataset = f"{cfg.fiftyone.dataset_prefix}-inbox"
    url = f"http://127.0.0.1:{port}/datasets/{dataset}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and app.poll() is None:
            try:
                if requests.get(url, timeout=2).ok:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        else:
            pytest.fail(f"the App did not answer at {url} (exit code {app.poll()})")
        ids = _inbox_ids(tmp_path / "data")
        a, b, c = ids[:3]
        facts = check(
            "tag_for_review",
            overrides=ours,
            dataset=dataset,
            verify=[a, b],
            reject=[c],
            reason="not a page",
            drop_first_box_of=a,
            edit=b,
        )
        yield Review(tmp_path / "data", ours, dataset, ids, url, facts["before"])
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(app.pid, signal.SIGINT)
        try:
            app.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(app.pid, signal.SIGKILL)
            app.wait()


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail("headless Chromium is needed for the App test: run `make chromium` (Debian package chromium)")
    return found


def colour_pixels(image: np.ndarray, colour: str, tolerance: int = 12) -> int:
    """Pixels of ``image`` (H x W x RGB) within ``tolerance`` of ``colour`` ('#rrggbb') in every channel."""
    rgb = np.array([int(colour.lstrip("#")[i : i + 2], 16) for i in (0, 2, 4)])
    return int((np.abs(image.astype(int) - rgb).max(axis=2) <= tolerance).sum())


def test_the_app_shows_the_inbox_with_proposed_labels_and_review_tags(review, tmp_path):
    # when the App serves the review dataset the reviewer tagged (2 verified, 1 rejected)
    png = tmp_path / "app_inbox.png"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--window-size=1920,1000",
        "--virtual-time-budget=25000",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    subprocess.run(
        [chromium(), *flags, f"--screenshot={png}", review.url], capture_output=True, timeout=180, check=True
    )
    print(f"screenshot: {png}")
    # then the screenshot is the sample grid (many colours: page images, boxes, tag pills), not the splash
    image = Image.open(png).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 1000, f"{png}: {len(colours or [])} colours (a loading splash?)"
    pixels = np.asarray(image)
    grid = pixels[140:, 320:]  # right of the sidebar, below the view bar
    assert np.asarray(image.convert("L"), dtype=np.float64)[140:, 320:].std() > 20  # pages, not a flat background
    # and the review tags are shown on the pages: two verified pills and one rejected pill in their colours
    r = compose(review.overrides).fiftyone.review
    verified, rejected = colour_pixels(grid, str(r.verified_color)), colour_pixels(grid, str(r.rejected_color))
    assert verified > 500 and rejected > 250, f"{png}: tag pill pixels verified {verified}, rejected {rejected}"


def test_review_commit_moves_exactly_the_verified_samples(review, capsys):
    data, overrides, ids = review.data, review.overrides, review.ids
    unlabelled = ids[-1]
    a, b, c = ids[:3]
    # given the inbox in the App with the production model's predictions as proposed labels
    proposed_a = (data / f"inbox/labels/{a}.txt").read_text().splitlines()
    facts = review.before
    assert facts["ids"] == sorted(ids) and "predictions_v1" in facts["fields"] and all(facts["filled"].values())
    # when the reviewer has tagged in the App (a: one wrong box; b: labels edited; c: rejected) and commits
    assert cli(["review", "commit", *overrides]) == 2  # no reviewer: refused, nothing changed
    assert _inbox_ids(data) == ids
    started = datetime.now(UTC).replace(microsecond=0)
    assert cli(["review", "commit", "--reviewer", "alice", *overrides]) == 0
    # then exactly a and b are in the pool, recorded with reviewer and time, with the verified labels
    pool = {row["id"]: row for row in read_manifest(data / "pool/manifest.jsonl")}
    new = {k: v for k, v in pool.items() if k in ids}
    assert set(new) == {a, b} and len(pool) == 14
    for row in new.values():
        assert row["reviewer"] == "alice" and row["decision"] == "accept" and row["labels_from"] == "corrected"
        assert started <= datetime.strptime(row["verified_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        assert row["split"] in ("train", "val", "holdout")
        assert sha256_file(next((data / "pool/images").glob(f"{row['id']}.*"))) == row["sha256"]
    labels_a = (data / f"pool/labels/{a}.txt").read_text().splitlines()
    assert len(labels_a) == len(proposed_a) - 1 and labels_a[0].split()[0] == proposed_a[1].split()[0]
    assert (data / f"pool/labels/{b}.txt").read_text() == "4 0.250000 0.400000 0.300000 0.400000\n"
    rejected = read_manifest(data / "inbox/rejected.jsonl")
    assert [(r["id"], r["reviewer"], r["reason"]) for r in rejected] == [(c, "alice", "not a page")]
    assert _inbox_ids(data) == [i for i in ids if i not in (a, b, c)] and unlabelled in _inbox_ids(data)
    left = check("dataset_facts", overrides=overrides, dataset=review.dataset)
    assert left["ids"] == sorted(set(ids) - {a, b, c})


def test_a_killed_review_leaves_inbox_and_pool_consistent(project, database, tmp_path):
    overrides = copy_project(project, database, tmp_path)
    data, cfg = tmp_path / "data", compose(overrides)
    dataset = f"{cfg.fiftyone.dataset_prefix}-inbox"
    assert cli(["review", "open", "--model", "production", *overrides]) == 0
    ids = _inbox_ids(data)
    a, b, c = ids[:3]
    check("tag_for_review", overrides=overrides, dataset=dataset, verify=[a, b], reject=[c])
    # when the database process is killed mid-review, the tags made in the App survive (mongod commits
    # its journal every 100 ms: a write acknowledged within the last 100 ms may be lost to SIGKILL)
    time.sleep(1.0)
    database.kill_and_restart()
    assert check("dataset_facts", overrides=overrides, dataset=dataset)["tags"] == {
        "inbox": 5,
        "verified": 2,
        "rejected": 1,
    }
    # when the commit is killed (SIGKILL) right after the pool records, before the inbox is cleaned
    killer = (
        "import os, signal, sys; import detloop.data.review as r; "
        "r.remove_from_inbox = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL); "
        "from detloop.cli.main import main; sys.exit(main(sys.argv[1:]))"
    )
    command = [sys.executable, "-c", killer, "review", "commit", "--reviewer", "bob", *overrides]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, timeout=300)
    assert done.returncode == -signal.SIGKILL
    # then nothing is lost: a and b are in the pool with their files, and still listed in the inbox
    pool = {row["id"]: row for row in read_manifest(data / "pool/manifest.jsonl")}
    assert {a, b} <= set(pool) and _inbox_ids(data) == ids
    for sample_id in (a, b):
        assert sha256_file(next((data / "pool/images").glob(f"{sample_id}.*"))) == pool[sample_id]["sha256"]
        assert (data / f"pool/labels/{sample_id}.txt").is_file()
    # and the next commit finishes the move: each sample in exactly one place, recorded once
    assert cli(["review", "commit", "--reviewer", "bob", *overrides]) == 0
    pool_rows = read_manifest(data / "pool/manifest.jsonl")
    assert sorted(r["id"] for r in pool_rows if r["id"] in ids) == sorted([a, b]) and len(pool_rows) == 14
    assert _inbox_ids(data) == ids[3:]
    assert not list((data / "inbox/images").glob(f"{a}.*")) and not list((data / "inbox/images").glob(f"{b}.*"))
    assert [r["id"] for r in read_manifest(data / "inbox/rejected.jsonl")] == [c]
    assert check("dataset_facts", overrides=overrides, dataset=dataset)["ids"] == sorted(ids[3:])


def test_the_tutorial_notebook_runs_top_to_bottom(project, database, tmp_path):
    overrides = copy_project(project, database, tmp_path)
    ours = [*overrides, "finetune.train.epochs=1", "finetune.train.plots=false"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DETLOOP_NOTEBOOK_OVERRIDES": json.dumps(ours)}
    notebook = ROOT / "notebooks" / "tutorial.ipynb"
    done = subprocess.run(
        [sys.executable, "-m", "tests.integration.run_notebook", str(notebook)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    assert "OK: 8 code cells" in done.stdout and "pages worse" in done.stdout and "change" in done.stdout
