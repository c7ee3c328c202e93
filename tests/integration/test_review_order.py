"""The review queue with a real (tiny, trained) detector: an unseen-domain report comes before a
near-duplicate of a reviewed one, in ``detloop review queue``, in the file-based listing and in the App.

The module trains one tiny base (64 px, 1 epoch, registered as v1 = production) on a copy of the tiny
demo data and adds two reports to its inbox: a negative scan (the demo generator's delivery note with
its colours inverted: white ink on black, a rendering the anchor never shows) and a re-encoded,
slightly brighter and noisier copy of a pool image.
"""

from __future__ import annotations

import io
import json
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tests.conftest import tiny_overrides
from tests.integration.conftest import own_mongod

from detloop.base import run as run_base
from detloop.cli.main import main as cli
from detloop.core.config import compose
from detloop.data.demo import render_sample
from detloop.data.inbox import add_to_inbox, report_id
from detloop.data.manifest import read_manifest, sha256_file

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def negative_scan(cfg, folder: Path) -> Path:
    """A delivery note from the demo generator, scanned, then inverted (a negative), with its labels."""
    sample = render_sample(cfg.demo, "unseen", 0, str(cfg.demo.failures.template), scanned=True)
    image = folder / "images" / "negative-scan.jpg"
    page = Image.open(io.BytesIO(sample.image)).convert("RGB")
    Image.fromarray(255 - np.asarray(page)).save(image, quality=90)
    (folder / "labels" / "negative-scan.txt").write_bytes(sample.labels)
    return image


def near_duplicate(pool: Path, folder: Path) -> tuple[Path, str]:
    """A pool image re-encoded 5 % brighter with a little noise (and its labels); returns it and the pool id."""
    row = read_manifest(pool / "manifest.jsonl")[0]
    original = np.asarray(Image.open(pool / "images" / f"{row['id']}.jpg").convert("RGB"), dtype=np.int16)
    noise = np.random.default_rng(0).integers(-4, 5, original.shape)
    image = folder / "images" / "rescan.jpg"
    Image.fromarray(np.clip(original * 1.05 + noise, 0, 255).astype(np.uint8)).save(image, quality=85)
    shutil.copyfile(pool / "labels" / f"{row['id']}.txt", folder / "labels" / "rescan.txt")
    return image, row["id"]


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_data):
    """Overrides of the project, and the inbox ids of the negative scan and of the copy (with its pool id)."""
    base = tmp_path_factory.mktemp("review-queue")
    shutil.copytree(tiny_data, base / "data")
    overrides = tiny_overrides(base)
    cfg = compose(overrides)
    run_base(cfg)
    reports = base / "reports"
    for sub in ("images", "labels"):
        (reports / sub).mkdir(parents=True)
    unseen = negative_scan(cfg, reports)
    copy, pool_id = near_duplicate(base / "data" / "pool", reports)
    assert add_to_inbox(reports / "images", cfg)["counts"]["accepted"] == 2
    ids = {"unseen": report_id(sha256_file(unseen)), "copy": report_id(sha256_file(copy)), "pool": pool_id}
    return overrides, ids


def test_the_queue_puts_an_unseen_domain_report_before_a_near_duplicate_of_a_reviewed_one(project, capsys):
    overrides, ids = project
    # when the reviewer asks for the queue (the production model, resolved from the registry)
    assert cli(["review", "queue", "--json", *overrides]) == 0
    queue = json.loads(capsys.readouterr().out)
    items = {item["id"]: item for item in queue["items"]}
    order = [item["id"] for item in queue["items"]]
    assert len(order) == 6 and queue["model"]["version"] == "1"
    # then the copy of the pool image is recognised as one, with the reason, and goes last
    copy = items[ids["copy"]]
    assert copy["duplicate_of"]["id"] == f"pool/{ids['pool']}" and copy["duplicate_of"]["cos"] >= 0.98
    assert copy["reason"].startswith(f"near-duplicate of pool/{ids['pool']} (cos 0.9")
    assert order[-1] == ids["copy"] and queue["counts"]["near_duplicates"] == 1
    # and the negative scan, the farthest from the anchor in the detector's own features, comes first
    unseen = items[ids["unseen"]]
    assert unseen["duplicate_of"] is None and order.index(ids["unseen"]) < order.index(ids["copy"])
    assert unseen["novelty"]["value"] == max(item["novelty"]["value"] for item in queue["items"])
    assert order[0] == ids["unseen"]
    assert "uncertainty" in unseen["reason"] and "the anchor's spacing" in unseen["reason"]


def test_the_anchor_is_embedded_once_and_the_listing_follows_the_queue(project, capsys):
    overrides, ids = project
    cfg = compose(overrides)
    cache = Path(str(cfg.inbox.queue.cache))
    assert cli(["review", "queue", *overrides]) == 0
    capsys.readouterr()
    anchors = sorted(cache.glob("v1-*/*/anchor-train-*.npz"))
    assert len(anchors) == 1
    stamp = anchors[0].stat().st_mtime_ns
    # when the queue is computed again, the cached anchor embeddings are read, not recomputed
    assert cli(["review", "queue", *overrides]) == 0
    out = capsys.readouterr().out
    assert anchors[0].stat().st_mtime_ns == stamp
    lines = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [words[1] for words in lines][0] == ids["unseen"] and lines[-1][1] == ids["copy"]
    assert lines[-1][2:5] == ["near-duplicate", "of", f"pool/{ids['pool']}"]
    # and the file-based review, given no ids, lists the inbox in the same order
    assert cli(["review", "reject", "--reviewer", "ana", *overrides]) == 2
    listed = [line.split()[1] for line in capsys.readouterr().err.splitlines() if "report-" in line]
    assert listed == [words[1] for words in lines]


@pytest.fixture
def database(tmp_path):
    with own_mongod(tmp_path / "db") as uri:
        yield uri


def test_the_app_shows_the_inbox_in_queue_order(project, database):
    from detloop.fiftyone import queue as review_queue
    from detloop.fiftyone.db import connect
    from detloop.fiftyone.inspection import app_url, resolve_models
    from detloop.fiftyone.review import open_review

    overrides, ids = project
    cfg = compose([*overrides, f"fiftyone.database.uri={database}", f"fiftyone.dataset_prefix=q{uuid.uuid4().hex[:8]}"])
    connect(cfg)
    # when the inbox is opened for review in the App
    result, dataset = open_review(cfg, resolve_models(cfg, ["production"]))
    # then each report carries its rank, score and reason, and the saved view by-value sorts by rank
    assert result["queue_view"] == "by-value"
    view = review_queue.saved_view(dataset)
    ranked = view.values("detloop_id")
    assert ranked[0] == ids["unseen"] and ranked[-1] == ids["copy"]
    assert view.values("queue_rank") == list(range(1, len(dataset) + 1))
    assert view.values("queue_duplicate_of")[-1] == f"pool/{ids['pool']}"
    assert view.values("queue_reason")[-1].startswith("near-duplicate of")
    saved = json.loads((Path(str(cfg.inbox.queue.cache)) / "queue.json").read_text())
    assert ranked == [item["id"] for item in saved["items"]]
    assert app_url(cfg, view).endswith(f"/datasets/{dataset.name}?view=by-value")
    assert app_url(cfg, dataset).endswith(f"/datasets/{dataset.name}")


def test_an_images_embedding_and_fingerprint_do_not_depend_on_the_pass_or_its_batch(project):
    from detloop.model.embed import Embedder

    overrides, _ = project
    cfg = compose(overrides)
    data = Path(str(cfg.paths.data))
    images = sorted((data / "inbox" / "images").glob("*.jpg")) + sorted((data / "pool" / "images").glob("*.jpg"))[:3]
    weights = sorted(Path(str(cfg.paths.build)).glob("base/runs/*/weights/best.pt"))[0]
    # given the detector's own layers read in a prediction pass, in Ultralytics' embed pass and image by image
    views = Embedder(weights, batch=4).predict(images, conf=0.001, iou=0.7, max_det=300)
    alone = Embedder(weights, batch=1)
    embeddings, fingerprints = alone.embed(images[::-1])[::-1], alone.fingerprint(images[::-1])[::-1]
    # then each image gets the same vectors, in the order it was given
    assert views.embeddings.shape == (len(images), 256) and len(views.found) == len(images)
    assert np.allclose(views.embeddings, embeddings, atol=1e-5)
    assert np.allclose(views.fingerprints, fingerprints, atol=1e-5)
    assert np.linalg.norm(views.fingerprints, axis=1) == pytest.approx(np.ones(len(images)), abs=1e-5)
