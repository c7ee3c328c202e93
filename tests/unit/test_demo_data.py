"""The embedded demo data set: deterministic, valid YOLO data, safe to rerun, never clobbers data."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detloop.core.config import compose
from detloop.core.errors import BadInput
from detloop.data.demo import CLASSES, Page, _rotate_points, write_demo_data
from detloop.data.manifest import read_manifest, sha256_file

TINY = {"anchor": {"train": 24, "val": 8, "test": 8}, "pool": 12, "inbox": 4}


def tiny_cfg(data: Path, *extra: str):
    return compose(
        [
            "experiment=tiny",
            f"paths.data={data}",
            f"paths.anchor={data}/anchor",
            f"paths.pool={data}/pool",
            f"paths.inbox={data}/inbox",
            *extra,
        ]
    )


def tree(folder: Path) -> dict[str, bytes]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, dict]:
    data = tmp_path_factory.mktemp("demo") / "data"
    return data, write_demo_data(tiny_cfg(data))


def test_two_writes_into_different_folders_are_byte_identical(written, tmp_path):
    # given the demo data written once
    data, _ = written
    # when it is written again into another folder
    other = tmp_path / "elsewhere" / "data"
    write_demo_data(tiny_cfg(other))
    # then both trees hold the same files with the same bytes
    assert tree(data) == tree(other)
    assert not [p for p in other.parent.iterdir() if p.name != "data"], "temp folders left behind"


def test_layout_and_counts_follow_the_config(written):
    # given the tiny demo data
    data, summary = written
    # then every anchor split, the pool and the inbox hold the configured number of images and labels
    for split, n in TINY["anchor"].items():
        assert len(list((data / "anchor/images" / split).glob("*.jpg"))) == n
        assert len(list((data / "anchor/labels" / split).glob("*.txt"))) == n
    for folder in ("pool", "inbox"):
        assert len(list((data / folder / "images").glob("*.jpg"))) == TINY[folder]
        assert len(list((data / folder / "labels").glob("*.txt"))) == TINY[folder]
    assert summary["anchor"] == TINY["anchor"]
    assert sum(summary["pool"].values()) == TINY["pool"] and summary["inbox"] == {"unreviewed": TINY["inbox"]}
    assert summary["changed"] is True and summary["classes"] == list(CLASSES)


def test_data_yaml_names_at_least_six_classes_and_the_splits(written):
    import yaml

    # given the anchor's dataset yaml
    data, _ = written
    spec = yaml.safe_load((data / "anchor/data.yaml").read_text())
    # then it names the six field classes and the three splits relative to itself
    assert len(spec["names"]) >= 6 and spec["nc"] == len(spec["names"])
    assert {"title", "date", "amount", "signature", "stamp", "table"} <= set(spec["names"].values())
    assert all((data / "anchor" / spec[s]).is_dir() for s in ("train", "val", "test"))


def test_every_label_is_valid_yolo_and_every_class_occurs(written):
    # given all label files of the demo data
    data, _ = written
    seen = Counter()
    for label in data.rglob("labels/**/*.txt"):
        # when each line is parsed
        lines = label.read_text().splitlines()
        assert lines, f"{label} has no objects"
        for line in lines:
            fields = line.split()
            # then it has 5 fields, a known class id and a box inside the image with a positive size
            assert len(fields) == 5, f"{label}: {line!r}"
            cls = int(fields[0])
            xc, yc, w, h = map(float, fields[1:])
            assert 0 <= cls < len(CLASSES)
            assert all(len(f.split(".")[1]) == 6 for f in fields[1:])
            assert w > 0 and h > 0
            assert xc - w / 2 >= -1e-6 and xc + w / 2 <= 1 + 1e-6
            assert yc - h / 2 >= -1e-6 and yc + h / 2 <= 1 + 1e-6
            seen[cls] += 1
    assert set(seen) == set(range(len(CLASSES)))


def test_images_are_small_jpegs_without_metadata(written):
    # given one anchor and one reported image
    data, _ = written
    firsts = (next((data / "anchor/images/train").glob("*.jpg")), next((data / "pool/images").glob("*.jpg")))
    for path in firsts:
        image = Image.open(io.BytesIO(path.read_bytes()))
        # then they are JPEG pages of the configured size without EXIF
        assert image.format == "JPEG" and image.size == (256, 320)
        assert not image.getexif()


def test_anchor_manifest_covers_every_image_with_its_hash_and_template(written):
    # given the anchor manifest
    data, _ = written
    rows = read_manifest(data / "anchor/manifest.jsonl")
    # then there is one row per image with split, hash and a source naming its layout template
    assert len(rows) == sum(TINY["anchor"].values())
    for row in rows:
        assert set(row) == {"id", "split", "sha256", "source"}
        assert row["sha256"] == sha256_file(data / "anchor/images" / row["split"] / f"{row['id']}.jpg")
    assert len({row["source"] for row in rows}) >= 3
    assert {row["split"] for row in rows} == {"train", "val", "test"}


def test_reported_failures_come_from_a_template_the_anchor_never_shows(written):
    # given the manifests of anchor, pool and inbox
    data, _ = written
    anchor = {row["source"] for row in read_manifest(data / "anchor/manifest.jsonl")}
    reported = {row["source"] for name in ("pool", "inbox") for row in read_manifest(data / name / "manifest.jsonl")}
    # then no reported page shares a layout with the anchor
    assert reported and not reported & anchor


def test_pool_manifest_rows_are_verified_with_fixed_splits(written):
    from detloop.data.manifest import split_for

    # given the pool manifest and the configured pool split
    data, _ = written
    fractions = dict(tiny_cfg(data).pool.split)
    rows = read_manifest(data / "pool/manifest.jsonl")
    assert len(rows) == TINY["pool"]
    for row in rows:
        # then each row carries review fields and the split fixed by its id
        assert set(row) == {"id", "sha256", "source", "reported_at", "reviewer", "verified_at", "split"}
        assert row["split"] == split_for(row["id"], fractions) and row["split"] in fractions
        assert row["reported_at"].endswith("Z") and row["reported_at"] < row["verified_at"]
        assert row["sha256"] == sha256_file(data / "pool/images" / f"{row['id']}.jpg")


def test_inbox_manifest_rows_are_unreviewed_reports(written):
    # given the inbox manifest
    data, _ = written
    rows = read_manifest(data / "inbox/manifest.jsonl")
    pool_ids = {row["id"] for row in read_manifest(data / "pool/manifest.jsonl")}
    # then each row is an unreviewed report, distinct from every pool sample
    assert len(rows) == TINY["inbox"]
    for row in rows:
        assert set(row) == {"id", "sha256", "source", "reported_at"}
        assert row["id"] not in pool_ids
        assert (data / "inbox/labels" / f"{row['id']}.txt").is_file()


def test_second_call_changes_nothing(written):
    # given the demo data written once, plus an Ultralytics label cache
    data, _ = written
    (data / "anchor/labels/train.cache").write_bytes(b"cache")
    before = {p: p.stat().st_mtime_ns for p in data.rglob("*")}
    # when the demo data is written again with the same config
    summary = write_demo_data(tiny_cfg(data))
    # then nothing is touched and the summary says so
    assert summary["changed"] is False
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*")} == before


def test_changing_one_count_keeps_every_other_page(written, tmp_path):
    # given the tiny demo data and a copy written with a larger anchor train split
    data, _ = written
    other = tmp_path / "data"
    write_demo_data(tiny_cfg(other, "demo.anchor.train=30"))
    # then the shared pages are byte-identical
    for name in ("anchor-train-00023", "anchor-test-00007"):
        split = name.split("-")[1]
        assert (other / "anchor/images" / split / f"{name}.jpg").read_bytes() == (
            data / "anchor/images" / split / f"{name}.jpg"
        ).read_bytes()
    assert tree(other / "pool") == {k: v for k, v in tree(data / "pool").items()}


def test_foreign_data_is_refused_and_left_unchanged(tmp_path):
    # given a data folder holding someone's own data set
    data = tmp_path / "data"
    (data / "anchor").mkdir(parents=True)
    (data / "anchor/data.yaml").write_text("names: {0: cat}\n")
    before = tree(data)
    # when the demo data is written without overwrite
    with pytest.raises(BadInput) as error:
        write_demo_data(tiny_cfg(data))
    # then it is refused with a message naming the folder and the way out, and nothing changed
    assert str(data) in str(error.value) and "demo.overwrite=true" in str(error.value)
    assert tree(data) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_overwrite_replaces_foreign_data_but_keeps_ignore_files(tmp_path, written):
    # given a data folder with foreign files, a stale cache and a .gitignore
    data = tmp_path / "data"
    (data / "pool/labels").mkdir(parents=True)
    (data / "pool/labels/extra.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    (data / "pool/labels.cache").write_bytes(b"stale")
    (data / ".gitignore").write_text("*.cache\n")
    # when the demo data is written with overwrite
    summary = write_demo_data(tiny_cfg(data, "demo.overwrite=true"))
    # then the folder holds exactly the demo data plus the ignore file
    assert summary["changed"] is True
    expected = tree(written[0])
    expected.pop("anchor/labels/train.cache", None)  # written by another test
    assert tree(data) == {**expected, ".gitignore": b"*.cache\n"}


def test_empty_data_folder_is_written(tmp_path):
    # given an existing, empty data folder
    data = tmp_path / "data"
    data.mkdir()
    # when the demo data is written
    summary = write_demo_data(tiny_cfg(data))
    # then it is filled
    assert summary["changed"] is True and (data / "anchor/data.yaml").is_file()


def test_unknown_template_is_bad_input(tmp_path):
    # given a config naming a layout that does not exist
    cfg = tiny_cfg(tmp_path / "data", "demo.failures.template=postcard")
    # when / then the config is refused before anything is written
    with pytest.raises(BadInput, match="postcard"):
        write_demo_data(cfg)
    assert not (tmp_path / "data").exists()


def test_rotated_points_follow_the_rotated_image():
    # given a page with one dark dot off-centre
    image = Image.new("L", (101, 81), 255)
    image.putpixel((80, 20), 0)
    angle = 7.0
    # when the image and the point are rotated the same way
    rotated = np.asarray(image.rotate(angle, resample=Image.Resampling.NEAREST, center=(50.5, 40.5), fillcolor=255))
    ((x, y),) = _rotate_points(np.array([[80.5, 20.5]]), angle, 50.5, 40.5)
    # then the dot lands where the point does
    ys, xs = np.nonzero(rotated < 128)
    assert abs(xs.mean() + 0.5 - x) <= 1 and abs(ys.mean() + 0.5 - y) <= 1


def test_page_helpers_draw_from_their_generator():
    # given two pages seeded alike
    a = Page(Image.new("RGB", (8, 8)), np.random.default_rng(1))
    b = Page(Image.new("RGB", (8, 8)), np.random.default_rng(1))
    # then they draw the same numbers
    assert [a.integer(0, 100) for _ in range(5)] == [b.integer(0, 100) for _ in range(5)]
