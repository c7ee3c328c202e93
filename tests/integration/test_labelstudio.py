"""Label Studio through FiftyOne's annotation API, for real: the server from its own virtualenv
(``detloop annotation up``), the inbox sent with its proposed boxes (``detloop review open`` + ``review
annotate``), boxes corrected in Label Studio's web UI by headless Chromium, and ``review commit`` landing
the corrected boxes in the pool with reviewer and time.

The ``detloop`` commands run as processes of their own (as a user runs them; each connects FiftyOne to
this module's mongod afresh). The server's virtualenv is the checkout's (``build/labelstudio/venv``,
``make labelstudio``); it is built here when missing, and the module is skipped only when that is
impossible outside CI (no package index). The server is stopped by pid at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import requests
from tests.conftest import ROOT, tiny_overrides
from tests.labelstudio_ui_driver import labeling_session
from tests.serving_helpers import anchor_classes, detector_weights

from detloop.core.config import compose
from detloop.data.manifest import read_manifest, sha256_file
from detloop.fiftyone import labelstudio
from detloop.fiftyone.db import start_mongod, stop_mongod

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def detloop(*args: str, **env: str) -> subprocess.CompletedProcess:
    """``detloop ARGS`` in a process of its own; Label Studio credentials only from ``env``."""
    clean = {k: v for k, v in os.environ.items() if k not in (labelstudio.ENV_URL, labelstudio.ENV_KEY)}
    command = [sys.executable, "-m", "detloop.cli.main", *args]
    return subprocess.run(command, cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=600)


def ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, f"{done.args[3:5]} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def refused(done: subprocess.CompletedProcess, *phrases: str) -> str:
    """Exit 2 with one ``error:`` message holding ``phrases``, and no traceback."""
    text = done.stderr
    assert done.returncode == 2, f"exit {done.returncode}:\n{done.stdout}\n{text}"
    assert "Traceback" not in text and all(p in text for p in phrases), text
    return text


@pytest.fixture(scope="module")
def server_venv():
    settings = labelstudio.Settings.of(compose([]))
    try:
        labelstudio.install(settings)
    except labelstudio.ServerFailed as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"the Label Studio server's virtualenv cannot be built here (no package index?): {err}")
    return settings


@dataclass
class Sent:
    """The inbox open for review and sent to Label Studio; the server's URL and login."""

    data: Path
    overrides: list[str]
    url: str
    project: int
    account: dict
    tasks: dict[str, dict]  # inbox id -> its Label Studio task (with the proposed boxes as a prediction)
    proposed: dict[str, list[str]]  # inbox id -> proposed label lines


def _tasks(url: str, key: str, project: int) -> dict[str, dict]:
    """The project's tasks by inbox id (the upload keeps the image's file name: '<prefix>-<id>.jpg')."""
    answer = requests.get(
        f"{url}/api/tasks",
        params={"project": project, "fields": "all", "page_size": 100},
        headers={"Authorization": f"Token {key}"},
        timeout=30,
    )
    answer.raise_for_status()
    found = answer.json()
    tasks = found["tasks"] if isinstance(found, dict) else found
    return {Path(t["data"]["image"]).stem.split("-", 1)[1]: t for t in tasks}


@pytest.fixture(scope="module")
def sent(tmp_path_factory, tiny_data, server_venv):
    base = tmp_path_factory.mktemp("labelstudio")
    shutil.copytree(tiny_data, base / "data")
    mongod = start_mongod(base / "fiftyone-db", detach=False)
    overrides = [
        *tiny_overrides(base),
        f"fiftyone.database.uri={mongod.uri}",
        f"fiftyone.dataset_prefix=ls{uuid.uuid4().hex[:6]}",
    ]
    weights = detector_weights(base / "weights.pt", anchor_classes(base / "data"), hot_class=0)
    command = [sys.executable, "-m", "detloop.cli.main", "annotation", "up", *overrides]
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # given the inbox open for review (proposed boxes as the labels to verify) and the server started meanwhile
        ok(detloop("review", "open", "--model", str(weights), *overrides))
        out, _ = server.communicate(timeout=300)
        assert server.returncode == 0, out
        print(out)
        folder = Path(labelstudio.Settings.of(compose(overrides)).dir)
        state = json.loads((folder / labelstudio.SERVER_FILE).read_text())
        account = json.loads((folder / labelstudio.SECRETS_FILE).read_text())
        assert oct((folder / labelstudio.SECRETS_FILE).stat().st_mode & 0o777) == "0o600"
        # when the inbox is sent to Label Studio
        out = ok(detloop("review", "annotate", *overrides))
        print(out)
        project = int(out.split("/projects/")[1].split()[0])
        tasks = _tasks(state["url"], account["api_key"], project)
        inbox = [row["id"] for row in read_manifest(base / "data/inbox/manifest.jsonl")]
        # then every report is a task there with its proposed boxes as a prediction
        assert sorted(tasks) == sorted(inbox)
        proposed = {i: (base / f"data/inbox/labels/{i}.txt").read_text().splitlines() for i in inbox}
        for sample_id, task in tasks.items():
            boxes = task["predictions"][0]["result"]
            assert len(boxes) == len(proposed[sample_id]) > 0
        yield Sent(base / "data", overrides, state["url"], project, account, tasks, proposed)
    finally:
        if server.poll() is None:
            server.wait(timeout=300)
        print(detloop("annotation", "down", *overrides).stdout)
        stop_mongod(mongod)


def test_a_server_that_does_not_answer_or_refuses_the_key_changes_nothing(sent):
    inbox_before = (sent.data / "inbox/manifest.jsonl").read_text()
    pool_before = (sent.data / "pool/manifest.jsonl").read_text()
    # when Label Studio does not answer, annotate says so (before FiftyOne is even started)
    closed = f"http://127.0.0.1:{_closed_port()}"
    refused(
        detloop(
            "review", "annotate", *sent.overrides, FIFTYONE_LABELSTUDIO_URL=closed, FIFTYONE_LABELSTUDIO_API_KEY="x"
        ),
        f"Label Studio at {closed} does not answer",
        "FIFTYONE_LABELSTUDIO_URL",
    )
    # and when it refuses the API key, the commit names the key's source and what kind of key works
    text = refused(
        detloop(
            "review",
            "commit",
            "--reviewer",
            "carol",
            *sent.overrides,
            FIFTYONE_LABELSTUDIO_URL=sent.url,
            FIFTYONE_LABELSTUDIO_API_KEY="0" * 40,
        ),
        "refused the API key from the environment",
        "legacy token",
    )
    assert "nothing was changed" in text
    # then nothing changed
    assert (sent.data / "inbox/manifest.jsonl").read_text() == inbox_before
    assert (sent.data / "pool/manifest.jsonl").read_text() == pool_before


def _closed_port() -> int:
    from detloop.core.env import free_port

    return free_port()


def _box(result: dict) -> np.ndarray:
    """A Label Studio rectangle (percent, top-left) as YOLO's normalized (xc, yc, w, h)."""
    v = result["value"]
    return np.array([v["x"] + v["width"] / 2, v["y"] + v["height"] / 2, v["width"], v["height"]]) / 100


def _lines(lines: list[str]) -> np.ndarray:
    return np.array([[float(v) for v in line.split()] for line in lines]).reshape(-1, 5)


def _largest(task: dict) -> tuple[int, np.ndarray]:
    boxes = [_box(r) for r in task["predictions"][0]["result"]]
    index = int(np.argmax([b[2] * b[3] for b in boxes]))
    return index, boxes[index]


def test_a_box_moved_in_label_studio_lands_in_the_pool(sent, tmp_path):
    moved, unchanged, pruned, untouched = sorted(sent.tasks)
    # given a reviewer in Label Studio's web UI who moves the largest proposed box of one report and submits,
    # submits another one unchanged and deletes the largest box of a third
    _, box = _largest(sent.tasks[moved])
    by = (0.05 if box[0] < 0.5 else -0.05, 0.03 if box[1] < 0.5 else -0.03)
    _, cut = _largest(sent.tasks[pruned])
    with labeling_session(
        sent.url, sent.account["username"], sent.account["password"], screenshot_dir=tmp_path / "ui"
    ) as ui:
        ui.open_task(sent.project, sent.tasks[moved]["id"])
        ui.move_box((box[0], box[1]), by)
        stored = ui.submit()
        ui.open_task(sent.project, sent.tasks[unchanged]["id"])
        ui.submit()
        ui.open_task(sent.project, sent.tasks[pruned]["id"])
        ui.delete_box((cut[0], cut[1]))
        ui.submit()
    print(f"screenshots: {tmp_path / 'ui'}")
    # the box Label Studio stored is the proposed one, moved by the drag
    after = min(
        (_box(r) for r in stored["result"]), key=lambda b: np.abs(b[2:] - box[2:]).sum() + np.abs(b[:2] - box[:2]).sum()
    )
    assert np.allclose(after[:2] - box[:2], by, atol=0.004) and np.allclose(after[2:], box[2:], atol=1e-6)
    # when the server is down at commit time, nothing is committed and nothing is lost
    ok(detloop("annotation", "down", *sent.overrides))
    refused(detloop("review", "commit", "--reviewer", "carol", *sent.overrides), "is not running", "annotation up")
    assert len(read_manifest(sent.data / "inbox/manifest.jsonl")) == 4
    # and after a restart (its database kept) the commit brings the submitted reports into the pool
    ok(detloop("annotation", "up", *sent.overrides))
    started = datetime.now(UTC).replace(microsecond=0)
    out = ok(detloop("review", "commit", "--reviewer", "carol", *sent.overrides))
    print(out)
    assert "3 sample(s) accepted" in out and "submitted there (verified): 3" in out
    pool = {row["id"]: row for row in read_manifest(sent.data / "pool/manifest.jsonl")}
    for sample_id, source in ((moved, "corrected"), (unchanged, "proposed"), (pruned, "corrected")):
        row = pool[sample_id]
        assert row["reviewer"] == "carol" and row["decision"] == "accept" and row["labels_from"] == source, row
        assert started <= datetime.strptime(row["verified_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        assert sha256_file(next((sent.data / "pool/images").glob(f"{sample_id}.*"))) == row["sha256"]
    # then the moved box is in the pool where the reviewer put it; the other boxes are as proposed
    labels = {
        i: _lines((sent.data / f"pool/labels/{i}.txt").read_text().splitlines()) for i in (moved, unchanged, pruned)
    }
    proposed = {i: _lines(sent.proposed[i]) for i in (moved, unchanged, pruned)}
    changed = ~np.all(np.isclose(labels[moved], proposed[moved], atol=1e-6), axis=1)
    assert changed.sum() == 1, (labels[moved], proposed[moved])
    line = labels[moved][changed][0]
    assert np.allclose(line[1:], after, atol=2e-6)  # what Label Studio stored, to the label file's 6 decimals
    assert np.allclose(line[1:3] - box[:2], by, atol=0.004)
    assert np.array_equal(labels[unchanged], proposed[unchanged])
    kept = [p for p in proposed[pruned] if not np.allclose(p[1:], cut, atol=2e-6)]
    assert len(kept) == len(proposed[pruned]) - 1 and np.allclose(
        sorted(map(tuple, labels[pruned])), sorted(map(tuple, kept)), atol=2e-6
    )
    # and the report nobody submitted waits in the inbox
    assert [row["id"] for row in read_manifest(sent.data / "inbox/manifest.jsonl")] == [untouched]


def test_annotating_again_replaces_the_project_with_what_still_waits(sent):
    (untouched,) = [row["id"] for row in read_manifest(sent.data / "inbox/manifest.jsonl")]
    # given the report nobody submitted, still a task of the first project
    # when the inbox is sent again
    out = ok(detloop("review", "annotate", *sent.overrides))
    # then the first project is replaced by one holding only what still waits, with its proposed boxes
    assert "1 report(s) sent" in out and "previous run's edits loaded (0 submitted" in out, out
    project = int(out.split("/projects/")[1].split()[0])
    url, key = out.split("/projects/")[0].split()[-1], sent.account["api_key"]
    assert url == sent.url  # the restarted server kept its port
    gone = requests.get(f"{url}/api/projects/{sent.project}", headers={"Authorization": f"Token {key}"}, timeout=30)
    assert project != sent.project and gone.status_code == 404
    tasks = _tasks(url, key, project)
    assert list(tasks) == [untouched]
    boxes = np.array([_box(r) for r in tasks[untouched]["predictions"][0]["result"]])
    proposed = _lines(sent.proposed[untouched])[:, 1:]
    assert np.allclose(sorted(map(tuple, boxes)), sorted(map(tuple, proposed)), atol=2e-6)
