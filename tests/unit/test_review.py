"""detloop review: only reviewed inbox samples enter the append-only pool, with reviewer, time and split."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from detloop.cli.main import main
from detloop.core.config import compose
from detloop.core.errors import BadInput
from detloop.data.inbox import add_to_inbox
from detloop.data.manifest import read_manifest, sha256_file, split_for
from detloop.data.review import record_data_version, review

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CORRECTED = "1 0.5 0.5 0.3 0.2\n2 0.2 0.8 0.1 0.1\n"
INBOX_IDS = ["report-00012", "report-00013", "report-00014", "report-00015"]  # the tiny demo inbox


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def cfg(overrides):
    return compose(overrides)


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and folder under ``folder``."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in folder.rglob("*")}


def refused(cfg, *args, **kwargs) -> BadInput:
    with pytest.raises(BadInput) as info:
        review(cfg, *args, **kwargs)
    return info.value


def assert_problem(err: BadInput, *parts: str) -> None:
    assert any(all(part in p for part in parts) for p in err.problems), (parts, err.problems)


# --------------------------------------------------------------------------- accept


def test_accept_moves_exactly_the_chosen_samples_with_reviewer_time_split_and_labels(tmp_path, cfg, data):
    # given two chosen inbox samples, one with corrected labels in a folder, one keeping its proposal
    corrected = tmp_path / "corrected"
    corrected.mkdir()
    (corrected / "report-00012.txt").write_text(CORRECTED)
    inbox_rows = {row["id"]: row for row in read_manifest(data / "inbox/manifest.jsonl")}
    images = {i: (data / f"inbox/images/{i}.jpg").read_bytes() for i in INBOX_IDS}
    proposed_14 = (data / "inbox/labels/report-00014.txt").read_bytes()
    pool_before = snapshot(data / "pool")
    manifest_before = (data / "pool/manifest.jsonl").read_bytes()
    # when a reviewer accepts them
    result = review(cfg, "accept", ["report-00012", "report-00014"], "a.chen", labels_dir=corrected)
    # then the pool manifest gained exactly two rows, appended after the untouched old ones
    manifest = (data / "pool/manifest.jsonl").read_bytes()
    assert manifest.startswith(manifest_before)
    new_rows = read_manifest(data / "pool/manifest.jsonl")[-2:]
    assert [row["id"] for row in new_rows] == ["report-00012", "report-00014"] == result["ids"]
    for row in new_rows:
        source = inbox_rows[row["id"]]
        assert {k: row[k] for k in ("sha256", "source", "reported_at")} == {
            k: source[k] for k in ("sha256", "source", "reported_at")
        }
        assert row["reviewer"] == "a.chen" and row["decision"] == "accept"
        assert row["verified_at"].endswith("Z") and len(row["verified_at"]) == 20
        assert row["split"] == split_for(row["id"], dict(cfg.pool.split))
        assert row["labels_sha256"] == sha256_file(data / f"pool/labels/{row['id']}.txt")
        assert (data / f"pool/images/{row['id']}.jpg").read_bytes() == images[row["id"]]
    assert (data / "pool/labels/report-00012.txt").read_text() == CORRECTED
    assert (data / "pool/labels/report-00014.txt").read_bytes() == proposed_14
    assert [row["labels_from"] for row in new_rows] == ["corrected", "proposed"]
    # and every file that was in the pool before is byte-identical
    after = snapshot(data / "pool")
    assert {k: after[k] for k in pool_before if k != "manifest.jsonl"} == {
        k: v for k, v in pool_before.items() if k != "manifest.jsonl"
    }
    # and the inbox no longer holds them (rows and files), the other two are untouched
    assert [row["id"] for row in read_manifest(data / "inbox/manifest.jsonl")] == ["report-00013", "report-00015"]
    assert sorted(p.stem for p in (data / "inbox/images").iterdir()) == ["report-00013", "report-00015"]
    assert sorted(p.stem for p in (data / "inbox/labels").iterdir()) == ["report-00013", "report-00015"]
    assert result["pool_size"] == 14 and result["inbox_size"] == 2
    assert result["data_version"] is None  # tmp data is outside the project: no dvc add


def test_a_sample_without_labels_cannot_be_accepted(tmp_path, cfg, data):
    # given a report added without proposed labels
    path = tmp_path / "r/a.jpg"
    path.parent.mkdir()
    Image.frombytes("RGB", (32, 32), random.Random(1).randbytes(32 * 32 * 3)).save(path)
    [sample_id] = add_to_inbox(path.parent, cfg)["accepted"]
    before = snapshot(data)
    # when it is accepted without corrected labels
    err = refused(cfg, "accept", [sample_id], "a.chen")
    # then it is refused and nothing changed
    assert_problem(err, sample_id, "unlabelled samples never enter the pool")
    assert snapshot(data) == before


def test_an_id_already_in_the_pool_is_refused(cfg, data):
    before = snapshot(data)
    err = refused(cfg, "accept", ["report-00003"], "a.chen")
    assert_problem(err, "report-00003", "already in the pool", "append-only")
    assert snapshot(data) == before


def test_every_problem_is_reported_at_once_and_nothing_is_written(tmp_path, cfg, data):
    # given an unknown id, no reviewer and a corrected label with a bad line
    corrected = tmp_path / "corrected"
    corrected.mkdir()
    (corrected / "report-00013.txt").write_text("0 0.5 0.5 0.2 0.2\n0 1.5 0.5 0.2 0.2\n")
    before = snapshot(data)
    # when the review is attempted
    err = refused(cfg, "accept", ["report-00012", "report-99999", "report-00013"], " ", labels_dir=corrected)
    # then each problem is named (the label by file:line) and data/ is byte-identical
    assert_problem(err, "--reviewer")
    assert_problem(err, "report-99999", "not in the inbox")
    assert_problem(err, f"{corrected / 'report-00013.txt'}:2", "xc=1.5")
    assert snapshot(data) == before


# --------------------------------------------------------------------------- reject


def test_reject_records_the_decision_and_keeps_the_files(cfg, data):
    # given an inbox sample
    image = (data / "inbox/images/report-00013.jpg").read_bytes()
    row = next(r for r in read_manifest(data / "inbox/manifest.jsonl") if r["id"] == "report-00013")
    pool_before = snapshot(data / "pool")
    # when it is rejected
    review(cfg, "reject", ["report-00013"], "s.ivanova", reason="label noise")
    # then the decision is recorded, the files moved to inbox/rejected/, and the pool is untouched
    [record] = read_manifest(data / "inbox/rejected.jsonl")
    assert {k: record[k] for k in ("id", "sha256", "reviewer", "decision", "reason")} == {
        "id": "report-00013",
        "sha256": row["sha256"],
        "reviewer": "s.ivanova",
        "decision": "reject",
        "reason": "label noise",
    }
    assert record["reviewed_at"].endswith("Z")
    assert (data / "inbox/rejected/report-00013.jpg").read_bytes() == image
    assert (data / "inbox/rejected/report-00013.txt").is_file()
    assert "report-00013" not in {r["id"] for r in read_manifest(data / "inbox/manifest.jsonl")}
    assert not (data / "inbox/images/report-00013.jpg").exists()
    assert snapshot(data / "pool") == pool_before
    # and a rejected sample cannot be reviewed again
    assert_problem(refused(cfg, "accept", ["report-00013"], "a.chen"), "already rejected by s.ivanova")


# --------------------------------------------------------------------------- the command line


def test_cli_failed_review_exits_2_and_leaves_the_pool_byte_identical(overrides, data, capsys):
    pool = snapshot(data / "pool")
    code = main(["review", "accept", "report-00012", "report-00001", "--reviewer", "a.chen", *overrides])
    assert code == 2
    assert "report-00001: already in the pool" in capsys.readouterr().err
    assert snapshot(data / "pool") == pool
    assert len(read_manifest(data / "inbox/manifest.jsonl")) == 4


def test_cli_accept_all_with_overrides_after_the_options(overrides, data, capsys):
    # given the four demo inbox samples, all with proposed labels
    # when all are accepted (overrides written after the options)
    code = main(["review", "accept", "--all", "--reviewer", "m.okafor", *overrides])
    # then they are in the pool and the inbox is empty
    assert code == 0, capsys.readouterr().err
    assert "4 sample(s) accepted into the pool by m.okafor" in capsys.readouterr().out
    assert [r["id"] for r in read_manifest(data / "pool/manifest.jsonl")][-4:] == INBOX_IDS
    assert read_manifest(data / "inbox/manifest.jsonl") == []


def test_cli_review_without_reviewer_exits_2(overrides, capsys):
    assert main(["review", "reject", "report-00012", *overrides]) == 2
    assert "--reviewer" in capsys.readouterr().err


def test_cli_unknown_options_are_still_usage_errors(overrides, data):
    before = snapshot(data)
    with pytest.raises(SystemExit) as info:
        main(["review", "accept", "report-00012", "--reviewer", "a.chen", "--bogus", *overrides])
    assert info.value.code == 2
    assert snapshot(data) == before


# --------------------------------------------------------------------------- data version


@pytest.mark.integration
def test_a_review_records_the_new_data_version_with_dvc(tmp_path, tiny_data, monkeypatch):
    # given a project folder whose data/ is tracked by data.dvc
    project = tmp_path / "project"
    shutil.copytree(tiny_data, project / "data")
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=project, check=True)
    subprocess.run([*dvc, "add", "-q", "data"], cwd=project, check=True)
    md5_before = yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]
    monkeypatch.setenv("DETLOOP_ROOT", str(PROJECT_ROOT))
    cfg = compose([])  # paths.data=data: relative to the project root
    monkeypatch.setenv("DETLOOP_ROOT", str(project))
    # when a sample is accepted
    result = review(cfg, "accept", ["report-00012"], "a.chen")
    # then data.dvc records the new version and DVC sees no change left
    md5_after = yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]
    assert md5_after != md5_before and result["data_version"] == md5_after
    status = subprocess.run([*dvc, "status", "data.dvc"], cwd=project, capture_output=True, text=True, check=True)
    assert "changed" not in status.stdout


def test_the_data_version_is_not_recorded_for_data_outside_the_project(cfg):
    assert record_data_version(cfg) is None
