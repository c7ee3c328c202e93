"""``detloop abset``: production images from the prediction log, reviewed into the labelled A/B set Gate 3 reads."""

from __future__ import annotations

import json

import pytest
from tests.serving_helpers import page_bytes

from detloop.cli.main import main
from detloop.core.config import compose
from detloop.core.errors import BadInput
from detloop.data.manifest import read_manifest, sha256_bytes
from detloop.evaluation import gating
from detloop.production import abset, predlog

DET = {"class_id": 2, "class_name": "amount", "confidence": 0.9, "xc": 0.5, "yc": 0.4, "w": 0.2, "h": 0.1}


@pytest.fixture
def project(overrides, data, tmp_path):
    """Given a log of 9 served images: 6 usable, one served twice, one anchor copy, one kept file gone,
    one without detections."""
    ab = [
        f"serve.predlog=sqlite:///{tmp_path / 'predlog.db'}",
        f"serve.abset.inbox={tmp_path / 'ab/inbox'}",
        f"serve.abset.verified={tmp_path / 'ab/verified'}",
    ]
    cfg = compose([*overrides, *ab])
    kept = tmp_path / "kept"
    kept.mkdir()
    anchor_copy = next((data / "anchor/images/train").iterdir()).read_bytes()
    images = [page_bytes(i) for i in range(7)] + [anchor_copy, page_bytes(99)]
    records = []
    for i, raw in enumerate(images):
        path = kept / f"{sha256_bytes(raw)}.jpg"
        if i != 8:  # the last one's kept file is gone
            path.write_bytes(raw)
        fields = predlog.detection_fields([] if i == 6 else [DET])
        for repeat in range(2 if i == 0 else 1):
            records.append(
                predlog.Record(
                    ts=1000.0 + i + repeat,
                    request_id=f"r{i}-{repeat}",
                    endpoint="invocations",
                    status=200,
                    model_version="4",
                    image_sha256=sha256_bytes(raw),
                    image_path=str(path),
                    **fields,
                )
            )
    records.append(predlog.Record(ts=2000.0, request_id="bad", endpoint="invocations", status=400, error="x"))
    store = predlog.open_log(cfg)
    store.write(records)
    store.close()
    return cfg, [*overrides, *ab], tmp_path / "ab"


def test_build_draws_distinct_kept_images_with_the_served_prediction_as_proposed_labels(project):
    cfg, _, ab = project
    result = abset.build(cfg, size=4)
    # drawn from the 8 distinct images that are not anchor copies (a missing file is found when drawn)
    assert result["drawn_from"] == 8 and len(result["added"]) == 4
    rows = read_manifest(ab / "inbox/manifest.jsonl")
    assert [r["id"] for r in rows] == result["added"] and len({r["sha256"] for r in rows}) == 4
    for row in rows:
        image = ab / "inbox/images" / f"{row['id']}.jpg"
        assert sha256_bytes(image.read_bytes()) == row["sha256"] and row["model_version"] == "4"
        label = ab / "inbox/labels" / f"{row['id']}.txt"
        assert label.exists() == row["has_labels"]  # nothing detected: nothing proposed
        if row["has_labels"]:
            assert label.read_text() == "2 0.500000 0.400000 0.200000 0.100000\n"
    # the same seed draws the same images; a second build adds only images not drawn yet
    again = abset.build(cfg, size=10)
    assert not set(again["added"]) & set(result["added"]) and len(again["added"]) == 3
    assert any("kept image of log row" in s and "is missing" in s for s in again["skipped"])
    with pytest.raises(BadInput, match="no production image to draw"):
        abset.build(cfg, size=1)


def test_reviewed_samples_form_the_labelled_set_the_gate_reads(project, tmp_path, capsys):
    cfg, overrides, ab = project
    added = abset.build(cfg, size=6)["added"]
    rows = {r["id"]: r for r in read_manifest(ab / "inbox/manifest.jsonl")}
    unlabelled = [i for i in added if not rows[i]["has_labels"]]
    assert len(unlabelled) == 1
    # when the reviewer accepts all, correcting the one without proposed labels
    corrected = tmp_path / "corrected"
    corrected.mkdir()
    (corrected / f"{unlabelled[0]}.txt").write_text("0 0.5 0.1 0.6 0.08\n")
    code = main(["abset", "review", "accept", "--all", "--reviewer", "qa", "--labels", str(corrected), *overrides])
    assert code == 0, capsys.readouterr().err
    # then the verified set holds images + labels with the review record, and the pending folder is empty
    verified = read_manifest(ab / "verified/manifest.jsonl")
    assert sorted(r["id"] for r in verified) == sorted(added) and {r["reviewer"] for r in verified} == {"qa"}
    assert read_manifest(ab / "inbox/manifest.jsonl") == []
    assert (ab / "verified/labels" / f"{unlabelled[0]}.txt").read_text() == "0 0.5 0.1 0.6 0.08\n"
    # and the gate's A/B sample reads it as is
    sample = gating.ab_sample(compose([*overrides, f"gate.ab.data={ab / 'verified'}", "gate.ab.size=100"]))
    assert sorted(p.stem for p in sample) == sorted(added)


def test_the_command_prints_the_next_steps(project, capsys):
    _, overrides, ab = project
    assert main(["abset", "build", "--size", "2", *overrides]) == 0
    out = capsys.readouterr().out
    assert "2 production image(s) drawn from 8 candidates" in out
    assert f"gate.ab.data={ab / 'verified'}" in out
    assert main(["abset", "build", "--size", "0", *overrides]) == 2
    assert main(["abset", "build", "--size", "1", "--json", *overrides]) == 0
    assert len(json.loads(capsys.readouterr().out)["added"]) == 1
