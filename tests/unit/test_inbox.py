"""detloop inbox add: reported failures are checked one by one; the refused ones are named with their reason."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
from PIL import Image

from detloop.cli.main import main
from detloop.core.config import compose
from detloop.core.errors import BadInput
from detloop.data.inbox import add_to_inbox, report_id
from detloop.data.manifest import read_manifest, sha256_file

BOX = "0 0.5 0.5 0.25 0.25\n"


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def cfg(overrides):
    return compose(overrides)


def write_image(path: Path, seed: int, size: tuple[int, int] = (32, 24), fmt: str = "JPEG") -> Path:
    """A small noise image, different for every seed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.frombytes("RGB", size, random.Random(seed).randbytes(size[0] * size[1] * 3)).save(path, fmt)
    return path


def write_label(image: Path, text: str) -> Path:
    """A label beside the image by the Ultralytics rule (images/x.jpg -> labels/x.txt)."""
    path = Path(str(image).replace("/images/", "/labels/")).with_suffix(".txt")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and folder under ``folder``."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in folder.rglob("*")}


def reason_of(result: dict, path: Path) -> str:
    reasons = [r["reason"] for r in result["refused"] if r["path"] == str(path)]
    assert len(reasons) == 1, (path, result["refused"])
    return reasons[0]


# --------------------------------------------------------------------------- accepted reports


def test_valid_reports_are_copied_and_recorded_with_their_proposed_labels(tmp_path, cfg, data):
    # given two new images, one with proposed labels beside it (Ultralytics layout)
    labelled = write_image(tmp_path / "reports/images/a.jpg", 1)
    write_label(labelled, BOX)
    bare = write_image(tmp_path / "reports/images/sub/b.png", 2, fmt="PNG")
    before = read_manifest(data / "inbox/manifest.jsonl")
    # when they are added with a note
    result = add_to_inbox(tmp_path / "reports", cfg, note="ticket 42")
    # then both are accepted under content-derived ids, files copied, rows appended after the old ones
    ids = [report_id(sha256_file(labelled)), report_id(sha256_file(bare))]
    assert result["accepted"] == ids and result["refused"] == []
    assert result["counts"] == {"accepted": 2, "refused": 0, "with_labels": 1, "inbox_size": len(before) + 2}
    rows = read_manifest(data / "inbox/manifest.jsonl")
    assert rows[: len(before)] == before
    new = {row["id"]: row for row in rows[len(before) :]}
    assert new[ids[0]]["has_labels"] is True and new[ids[1]]["has_labels"] is False
    assert new[ids[0]]["source"] == str(labelled) and new[ids[0]]["note"] == "ticket 42"
    assert new[ids[0]]["reported_at"].endswith("Z") and len(new[ids[0]]["reported_at"]) == 20
    assert (data / f"inbox/images/{ids[0]}.jpg").read_bytes() == labelled.read_bytes()
    assert (data / f"inbox/images/{ids[1]}.png").read_bytes() == bare.read_bytes()
    assert (data / f"inbox/labels/{ids[0]}.txt").read_text() == BOX
    assert not (data / f"inbox/labels/{ids[1]}.txt").exists()
    # and no temporary file is left behind
    assert not [p for p in (data / "inbox").rglob(".*")]


def test_labels_from_an_explicit_folder_are_matched_by_stem(tmp_path, cfg, data):
    # given flat images and a separate folder of proposed labels
    image = write_image(tmp_path / "flat/x1.jpg", 3)
    write_image(tmp_path / "flat/x2.jpg", 4)
    (tmp_path / "proposals").mkdir()
    (tmp_path / "proposals/x1.txt").write_text(BOX)
    # when they are added with --labels
    result = add_to_inbox(tmp_path / "flat", cfg, labels=tmp_path / "proposals")
    # then x1 carries its labels, x2 none
    first = report_id(sha256_file(image))
    assert result["counts"]["with_labels"] == 1
    assert (data / f"inbox/labels/{first}.txt").read_text() == BOX


def test_a_txt_list_of_image_paths_is_a_source(tmp_path, cfg):
    # given a list with one relative path, one missing file and a comment
    write_image(tmp_path / "pics/p.jpg", 5)
    listing = tmp_path / "list.txt"
    listing.write_text("# reported today\npics/p.jpg\npics/missing.jpg\n")
    # when it is added
    result = add_to_inbox(listing, cfg)
    # then the existing image is accepted and the missing one refused with list:line
    assert len(result["accepted"]) == 1
    assert result["refused"] == [
        {"path": f"{listing}:3", "reason": f"image {tmp_path / 'pics/missing.jpg'} does not exist"}
    ]


# --------------------------------------------------------------------------- refusals


def test_every_refusal_names_its_reason_and_the_rest_is_accepted(tmp_path, cfg, data):
    # given a batch with one good image and one of each kind of bad report
    src = tmp_path / "batch" / "images"
    good = write_image(src / "good.jpg", 10)
    corrupt = src / "corrupt.jpg"
    corrupt.write_bytes(b"this is not a JPEG")
    truncated = write_image(src / "truncated.jpg", 11, size=(64, 64))
    truncated.write_bytes(truncated.read_bytes()[:-200])
    small = write_image(src / "small.jpg", 12, size=(8, 8))
    bad_label = write_image(src / "badlabel.jpg", 13)
    label = write_label(bad_label, BOX + "7 0.5 0.5 0.1 0.1\n")
    inbox_dup = shutil.copy(sorted((data / "inbox/images").iterdir())[0], src / "inbox_dup.jpg")
    pool_dup = shutil.copy(sorted((data / "pool/images").iterdir())[0], src / "pool_dup.jpg")
    batch_dup = shutil.copy(good, src / "good_again.jpg")
    leak = shutil.copy(sorted((data / "anchor/images/test").iterdir())[0], src / "leak.jpg")
    # when the batch is added
    result = add_to_inbox(tmp_path / "batch", cfg)
    # then the good image is accepted and each bad one is refused with its own reason
    assert result["accepted"] == [report_id(sha256_file(good))]
    assert result["counts"]["refused"] == 8
    assert "cannot be decoded" in reason_of(result, corrupt)
    assert "truncated" in reason_of(result, truncated)
    assert "smaller than 10 px" in reason_of(result, small)
    assert f"{label}:2: class id 7" in reason_of(result, bad_label)
    assert "duplicate of inbox sample report-" in reason_of(result, Path(inbox_dup))
    assert "duplicate of pool sample report-" in reason_of(result, Path(pool_dup))
    assert f"duplicate of {good} in this batch" in reason_of(result, Path(batch_dup))
    assert "anchor test image anchor-test-" in reason_of(result, Path(leak))
    assert "test leakage" in reason_of(result, Path(leak))


def test_inbox_min_side_comes_from_the_config(tmp_path, overrides):
    # given a 32x24 image and inbox.min_side=30
    image = write_image(tmp_path / "r/a.jpg", 20)
    cfg = compose([*overrides, "inbox.min_side=30"])
    # when it is added
    result = add_to_inbox(tmp_path / "r", cfg)
    # then it is refused naming the config key
    assert "smaller than inbox.min_side=30 px" in reason_of(result, image)


def test_an_image_over_inbox_max_pixels_is_refused(tmp_path, overrides):
    image = write_image(tmp_path / "r/a.jpg", 21, size=(40, 40))
    result = add_to_inbox(tmp_path / "r", compose([*overrides, "inbox.max_pixels=100"]))
    assert "too large" in reason_of(result, image)


def test_a_report_identical_to_a_rejected_one_is_refused(tmp_path, cfg, data):
    # given an image that was reported and rejected
    from detloop.data.review import review

    image = write_image(tmp_path / "r/a.jpg", 22)
    [sample_id] = add_to_inbox(tmp_path / "r", cfg)["accepted"]
    review(cfg, "reject", [sample_id], reviewer="m.okafor", reason="not a failure")
    # when it is reported again
    result = add_to_inbox(tmp_path / "r", cfg)
    # then it is refused, naming the earlier decision
    assert f"duplicate of {sample_id}, rejected by m.okafor" in reason_of(result, image)


# --------------------------------------------------------------------------- the command line


def test_cli_exits_2_on_refusals_keeps_the_accepted_and_never_touches_the_pool(tmp_path, overrides, data, capsys):
    # given one good and one corrupt image
    good = write_image(tmp_path / "r/good.jpg", 30)
    (tmp_path / "r/bad.jpg").write_bytes(b"\xff\xd8 broken")
    pool = snapshot(data / "pool")
    # when they are added through the CLI
    code = main(["inbox", "add", str(tmp_path / "r"), "--note", "cli", *overrides])
    # then it exits 2, prints counts and the refusal, keeps the good one, and the pool is byte-identical
    out, err = capsys.readouterr()
    assert code == 2
    assert "accepted 1" in out and "refused 1" in out
    assert f"refused {tmp_path / 'r/bad.jpg'}: cannot be decoded" in err
    assert report_id(sha256_file(good)) in {row["id"] for row in read_manifest(data / "inbox/manifest.jsonl")}
    assert snapshot(data / "pool") == pool


def test_cli_exits_0_when_everything_is_accepted(tmp_path, overrides):
    write_image(tmp_path / "r/good.jpg", 31)
    assert main(["inbox", "add", str(tmp_path / "r"), *overrides]) == 0


@pytest.mark.parametrize("make_source", ["missing", "empty", "only_text"])
def test_a_missing_or_empty_source_exits_2_and_writes_nothing(tmp_path, overrides, data, make_source, capsys):
    # given a source that holds no images
    source = tmp_path / "src"
    if make_source != "missing":
        source.mkdir()
    if make_source == "only_text":
        (source / "notes.md").write_text("no images here")
    before = snapshot(data)
    # when it is added
    code = main(["inbox", "add", str(source), *overrides])
    # then it exits 2 naming the source, and nothing under data/ changed
    assert code == 2
    assert str(source) in capsys.readouterr().err
    assert snapshot(data) == before


def test_a_missing_labels_folder_is_bad_input(tmp_path, cfg, data):
    write_image(tmp_path / "r/a.jpg", 40)
    before = snapshot(data)
    with pytest.raises(BadInput, match="labels folder does not exist"):
        add_to_inbox(tmp_path / "r", cfg, labels=tmp_path / "nowhere")
    assert snapshot(data) == before
