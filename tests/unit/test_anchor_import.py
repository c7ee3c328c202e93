"""detloop anchor import: validate an Ultralytics dataset, then make it the anchor (or change nothing)."""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from PIL import Image, ImageFile

from detloop.core.config import compose
from detloop.core.errors import BadInput
from detloop.data.anchor import import_anchor, plan_anchor, write_anchor
from detloop.data.manifest import read_manifest, sha256_file
from detloop.data.yolo_format import (
    IMG_FORMATS,
    check_image,
    check_label_file,
    label_path_for,
    load_data_yaml,
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
NAMES = ["cat", "dog"]
BOX = "0 0.5 0.5 0.25 0.25\n"


# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _project_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETLOOP_ROOT", str(PROJECT_ROOT))


@pytest.fixture
def anchor(tmp_path: Path) -> Path:
    return tmp_path / "data" / "anchor"


@pytest.fixture
def cfg(anchor: Path):
    return compose([f"paths.data={anchor.parent}"])  # anchor, pool and inbox under tmp_path/data


def write_image(path: Path, seed: int, size: tuple[int, int] = (32, 24), fmt: str = "JPEG") -> Path:
    """A small noise image, different for every seed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = random.Random(seed).randbytes(size[0] * size[1] * 3)
    Image.frombytes("RGB", size, pixels).save(path, fmt)
    return path


def write_label(ds: Path, split: str, stem: str, text: str) -> Path:
    path = ds / "labels" / split / f"{stem}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def make_dataset(ds: Path, seed: int = 0, names: object = NAMES, extra: dict | None = None) -> Path:
    """A valid dataset: train a (2 boxes), b (1 box); val c (1 box); test d (1 box), e (background)."""
    labels = {
        "train": {"a": BOX + "1 0.2 0.3 0.1 0.2\n", "b": BOX},
        "val": {"c": BOX},
        "test": {"d": "1 0.5 0.5 1 1\n", "e": None},
    }
    for i, (split, stems) in enumerate((s, st) for s, st in labels.items() for st in labels[s].items()):
        stem, text = stems
        write_image(ds / "images" / split / f"{stem}.jpg", seed * 100 + i)
        if text is not None:
            write_label(ds, split, stem, text)
    data = {
        "path": ".",
        "train": "images/train",
        "val": "images/val",
        "test": "images/test",
        "names": names,
        **(extra or {}),
    }
    (ds / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return ds


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and folder under ``folder``."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in folder.rglob("*")}


def refused(source: Path, cfg, replace: bool = False) -> BadInput:
    with pytest.raises(BadInput) as info:
        import_anchor(source, cfg, replace=replace)
    return info.value


def assert_problem(err: BadInput, *parts: str) -> None:
    assert any(all(part in p for part in parts) for p in err.problems), (parts, err.problems)


# --------------------------------------------------------------------------- valid imports


def test_valid_dataset_is_imported_with_matching_manifest(tmp_path, cfg, anchor):
    # given a valid dataset
    ds = make_dataset(tmp_path / "src")
    # when it is imported
    summary = import_anchor(ds, cfg)
    # then the anchor holds every image and label, and the manifest hashes match the bytes
    rows = read_manifest(anchor / "manifest.jsonl")
    assert [r["id"] for r in rows] == ["test/d", "test/e", "train/a", "train/b", "val/c"]
    for row in rows:
        split, stem = row["id"].split("/")
        assert row["split"] == split
        assert row["sha256"] == sha256_file(anchor / "images" / split / f"{stem}.jpg")
        assert row["sha256"] == sha256_file(row["source"])
        assert row["source"] == str(ds / "images" / split / f"{stem}.jpg")
    assert (anchor / "labels/train/a.txt").read_bytes() == (ds / "labels/train/a.txt").read_bytes()
    assert yaml.safe_load((anchor / "data.yaml").read_text()) == {  # no path: (Ultralytics reads . as CWD)
        "train": "images/train",
        "val": "images/val",
        "test": "images/test",
        "names": {0: "cat", 1: "dog"},
    }
    assert summary["splits"] == {
        "train": {"images": 2, "labels": 2, "background": 0, "boxes": 3},
        "val": {"images": 1, "labels": 1, "background": 0, "boxes": 1},
        "test": {"images": 2, "labels": 1, "background": 1, "boxes": 1},
    }
    assert summary["target"] == str(anchor) and summary["names"] == {0: "cat", 1: "dog"}
    # and nothing but the anchor and an empty pool and inbox were left beside it
    assert sorted(p.name for p in anchor.parent.iterdir()) == ["anchor", "inbox", "pool"]


def test_the_first_import_starts_an_empty_pool_and_inbox(tmp_path, cfg, anchor):
    # given a fresh project: no data folder at all
    assert not anchor.parent.exists()
    # when a dataset is imported
    summary = import_anchor(make_dataset(tmp_path / "src"), cfg)
    # then the pool and the inbox exist with an empty manifest each (files, so `dvc add data` records them)
    for key in ("pool", "inbox"):
        assert (anchor.parent / key / "manifest.jsonl").read_bytes() == b""
        assert [p.name for p in (anchor.parent / key).iterdir()] == ["manifest.jsonl"]
    assert summary["started"] == [str(anchor.parent / k / "manifest.jsonl") for k in ("pool", "inbox")]


def test_replacing_the_anchor_leaves_pool_and_inbox_as_they_are(tmp_path, cfg, anchor):
    # given a project whose pool and inbox hold samples
    pool_rows = b'{"id":"r1","split":"train"}\n'
    (anchor.parent / "pool").mkdir(parents=True)
    (anchor.parent / "pool" / "manifest.jsonl").write_bytes(pool_rows)
    import_anchor(make_dataset(tmp_path / "old", seed=7), cfg)
    (anchor.parent / "inbox" / "manifest.jsonl").write_bytes(b'{"id":"r2"}\n')
    before = {k: snapshot(anchor.parent / k) for k in ("pool", "inbox")}
    # when the anchor is replaced
    summary = import_anchor(make_dataset(tmp_path / "src"), cfg, replace=True)
    # then neither the append-only pool nor the inbox changed, and nothing was started
    assert {k: snapshot(anchor.parent / k) for k in ("pool", "inbox")} == before
    assert before["pool"] == {"manifest.jsonl": pool_rows}
    assert summary["started"] == []


def test_written_anchor_is_itself_a_valid_dataset(tmp_path, cfg, anchor, monkeypatch):
    # given an imported anchor
    import_anchor(make_dataset(tmp_path / "src"), cfg)
    # when its data.yaml is loaded from elsewhere
    monkeypatch.chdir(tmp_path)
    spec = load_data_yaml(anchor / "data.yaml")
    # then it resolves to the anchor folder
    assert spec.root == anchor
    assert spec.splits == {s: anchor / "images" / s for s in ("train", "val", "test")}


def test_image_without_label_is_a_background_image(tmp_path, cfg, anchor):
    # given a dataset where test/e has no label file
    ds = make_dataset(tmp_path / "src")
    assert not (ds / "labels/test/e.txt").exists()
    # when it is imported
    summary = import_anchor(ds, cfg)
    # then e is accepted, counted as background, and gets an empty label file
    assert summary["splits"]["test"]["background"] == 1
    assert (anchor / "images/test/e.jpg").is_file()
    assert (anchor / "labels/test/e.txt").read_bytes() == b""


def test_empty_label_file_is_a_background_image(tmp_path, cfg):
    # given an empty label file
    ds = make_dataset(tmp_path / "src")
    write_label(ds, "train", "b", "")
    # when it is imported
    summary = import_anchor(ds, cfg)
    # then b counts as background
    assert summary["splits"]["train"] == {"images": 2, "labels": 1, "background": 1, "boxes": 2}


@pytest.mark.parametrize(
    "names", [["cat", "dog"], {0: "cat", 1: "dog"}, {1: "dog", 0: "cat"}, {"0": "cat", "1": "dog"}]
)
def test_names_as_list_or_dict(tmp_path, cfg, anchor, names):
    # given names written as a list or as an {id: name} map
    ds = make_dataset(tmp_path / "src", names=names)
    # when imported
    summary = import_anchor(ds, cfg)
    # then the anchor has names as {id: name}
    assert summary["names"] == {0: "cat", 1: "dog"}
    assert yaml.safe_load((anchor / "data.yaml").read_text())["names"] == {0: "cat", 1: "dog"}


def test_relative_path_is_relative_to_the_yaml_not_the_cwd(tmp_path, cfg, anchor, monkeypatch):
    # given a data.yaml in a subfolder whose relative path: points one level up
    ds = make_dataset(tmp_path / "src")
    (ds / "data.yaml").unlink()
    meta = ds / "meta"
    meta.mkdir()
    (meta / "data.yaml").write_text(
        yaml.safe_dump(
            {"path": "..", "train": "images/train", "val": "images/val", "test": "images/test", "names": NAMES}
        )
    )
    # and the CWD elsewhere (where ../images does not exist)
    elsewhere = tmp_path / "elsewhere" / "deeper"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    # when imported
    assert load_data_yaml(meta / "data.yaml").root == ds
    summary = import_anchor(meta / "data.yaml", cfg)
    # then the splits were found beside the yaml's folder
    assert sum(c["images"] for c in summary["splits"].values()) == 5


def test_missing_path_key_means_the_yamls_folder(tmp_path, monkeypatch):
    # given a data.yaml without path:
    ds = make_dataset(tmp_path / "src")
    data = yaml.safe_load((ds / "data.yaml").read_text())
    del data["path"]
    (ds / "data.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.chdir(tmp_path)
    # when loaded, then the root is the yaml's folder
    assert load_data_yaml(ds / "data.yaml").root == ds


def test_split_given_as_txt_list(tmp_path, cfg):
    # given a dataset whose val split is a .txt list with relative entries
    ds = make_dataset(tmp_path / "src")
    (ds / "val.txt").write_text("# val images\n./images/val/c.jpg\n\n")
    data = yaml.safe_load((ds / "data.yaml").read_text())
    (ds / "data.yaml").write_text(yaml.safe_dump({**data, "val": "val.txt"}))
    # when imported
    summary = import_anchor(ds, cfg)
    # then the listed image is the val split
    assert summary["splits"]["val"]["images"] == 1


# --------------------------------------------------------------------------- refusals change nothing


def corrupt_image(ds: Path) -> tuple[str, ...]:
    path = ds / "images/train/a.jpg"
    path.write_bytes(random.Random(1).randbytes(3000))
    return str(path), "cannot be decoded"


def truncated_jpeg(ds: Path) -> tuple[str, ...]:
    path = ds / "images/val/c.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return str(path), "cannot be decoded"


def jpeg_without_end_marker(ds: Path) -> tuple[str, ...]:
    path = ds / "images/val/c.jpg"
    path.write_bytes(path.read_bytes()[:-2])
    return str(path), "truncated"


def label_with_4_fields(ds: Path) -> tuple[str, ...]:
    path = write_label(ds, "train", "a", BOX + "0 0.5 0.5 0.2\n")
    return f"{path}:2", "4 fields"


def class_out_of_range(ds: Path) -> tuple[str, ...]:
    path = write_label(ds, "val", "c", "2 0.5 0.5 0.2 0.2\n")
    return f"{path}:1", "class id 2", "[0, 2)"


def coordinate_above_one(ds: Path) -> tuple[str, ...]:
    path = write_label(ds, "train", "b", "0 1.3 0.5 0.2 0.2\n")
    return f"{path}:1", "xc=1.3", "outside [0, 1]"


def negative_width(ds: Path) -> tuple[str, ...]:
    path = write_label(ds, "train", "b", BOX + BOX + "1 0.5 0.5 -0.2 0.2\n")
    return f"{path}:3", "w=-0.2", "> 0"


def missing_data_yaml(ds: Path) -> tuple[str, ...]:
    (ds / "data.yaml").unlink()
    return str(ds / "data.yaml"), "does not exist"


def label_without_image(ds: Path) -> tuple[str, ...]:
    path = write_label(ds, "val", "ghost", BOX)
    return str(path), "without an image"


def duplicate_across_train_and_test(ds: Path) -> tuple[str, ...]:
    shutil.copyfile(ds / "images/train/a.jpg", ds / "images/test/a_copy.jpg")
    return str(ds / "images/train/a.jpg"), str(ds / "images/test/a_copy.jpg"), "train and test", "leakage"


BAD_CASES: list[Callable[[Path], tuple[str, ...]]] = [
    corrupt_image,
    truncated_jpeg,
    jpeg_without_end_marker,
    label_with_4_fields,
    class_out_of_range,
    coordinate_above_one,
    negative_width,
    missing_data_yaml,
    label_without_image,
    duplicate_across_train_and_test,
]


@pytest.mark.parametrize("previous_anchor", [False, True], ids=["no-anchor", "previous-anchor"])
@pytest.mark.parametrize("break_it", BAD_CASES, ids=lambda f: f.__name__)
def test_bad_input_is_refused_and_changes_nothing(tmp_path, cfg, break_it, previous_anchor):
    # given (maybe) an existing anchor and a dataset with one problem
    if previous_anchor:
        import_anchor(make_dataset(tmp_path / "old", seed=7), cfg)
    ds = make_dataset(tmp_path / "src")
    expected = break_it(ds)
    before = snapshot(tmp_path / "data")
    # when it is imported (replace=True, so only the data problem can refuse it)
    err = refused(ds, cfg, replace=True)
    # then the problem names the file (and line), and the data folder is byte-identical
    assert_problem(err, *expected)
    assert snapshot(tmp_path / "data") == before


def test_every_problem_is_reported_at_once(tmp_path, cfg):
    # given a dataset with several problems in different files
    ds = make_dataset(tmp_path / "src")
    cases = [
        corrupt_image,
        label_with_4_fields,
        coordinate_above_one,
        label_without_image,
        class_out_of_range,
        duplicate_across_train_and_test,
    ]  # the duplicate of a corrupt image too
    expected = [case(ds) for case in cases]
    # when imported, then all of them are listed
    err = refused(ds, cfg)
    for parts in expected:
        assert_problem(err, *parts)
    assert str(ds) in err.summary and "nothing was written" in err.summary


def test_too_many_pixels_from_config_is_refused(tmp_path, anchor):
    # given a pixel limit below the dataset's 32x24 images, set in the config
    cfg = compose([f"paths.data={anchor.parent}", "+yolo_format.max_pixels=500"])
    ds = make_dataset(tmp_path / "src")
    # when imported, then each image is too large, and nothing is written
    err = refused(ds, cfg)
    assert_problem(err, str(ds / "images/train/a.jpg"), "too large")
    assert not (tmp_path / "data").exists()


def test_replace_false_refuses_an_existing_anchor(tmp_path, cfg, anchor):
    # given an existing anchor
    import_anchor(make_dataset(tmp_path / "old", seed=7), cfg)
    before = snapshot(tmp_path / "data")
    # when another valid dataset is imported without replace
    err = refused(make_dataset(tmp_path / "src"), cfg)
    # then it is refused, naming the anchor, and nothing changed
    assert_problem(err, str(anchor), "already exists")
    assert snapshot(tmp_path / "data") == before


def test_replace_true_replaces_the_anchor(tmp_path, cfg, anchor):
    # given an existing anchor from another dataset
    import_anchor(make_dataset(tmp_path / "old", seed=7), cfg)
    (anchor / "stale.txt").write_text("from the old anchor")
    ds = make_dataset(tmp_path / "src")
    # when the new dataset is imported with replace
    import_anchor(ds, cfg, replace=True)
    # then the anchor is exactly the new dataset, and no temp or backup folder is left
    rows = read_manifest(anchor / "manifest.jsonl")
    assert {Path(r["source"]).parent.parent.parent for r in rows} == {ds}
    assert not (anchor / "stale.txt").exists()
    assert sorted(p.name for p in anchor.parent.iterdir()) == ["anchor", "inbox", "pool"]


def test_empty_anchor_folder_is_not_an_anchor(tmp_path, cfg, anchor):
    # given an empty anchor folder
    anchor.mkdir(parents=True)
    # when imported without replace, then it is filled
    import_anchor(make_dataset(tmp_path / "src"), cfg)
    assert (anchor / "manifest.jsonl").is_file()


def test_source_changed_after_validation_writes_nothing(tmp_path, anchor):
    # given a validated plan
    ds = make_dataset(tmp_path / "src")
    plan = plan_anchor(ds, anchor)
    # when an image changes before the copy
    write_image(ds / "images/val/c.jpg", seed=999)
    # then writing is refused and no anchor (nor temp folder) is left
    with pytest.raises(BadInput, match="changed"):
        write_anchor(plan, anchor)
    assert list(anchor.parent.iterdir()) == []


# --------------------------------------------------------------------------- yolo_format units


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("0 0.5 0.5 0.2", "4 fields"),
        ("0 0.5 0.5 0.2 0.2 0.3 0.3", "segment/polygon"),
        ("zero 0.5 0.5 0.2 0.2", "'zero' is not a number"),
        ("0 nan 0.5 0.2 0.2", "not a finite number"),
        ("0.5 0.5 0.5 0.2 0.2", "class id 0.5 is not an integer"),
        ("-1 0.5 0.5 0.2 0.2", "class id -1"),
        ("0 0.5 -0.1 0.2 0.2", "yc=-0.1"),
        ("0 0.5 0.5 0.2 0", "h=0 must be > 0"),
    ],
)
def test_label_line_problems_name_file_and_line(tmp_path, line, expected):
    # given a label file whose second line is bad
    path = tmp_path / "labels" / "x.txt"
    path.parent.mkdir()
    path.write_text(BOX + line + "\n")
    # when checked, then the problem names file:2 and what is wrong
    problems = check_label_file(path, num_classes=2)
    assert len(problems) == 1 and problems[0].startswith(f"{path}:2: ") and expected in problems[0]


def test_valid_label_file_with_blank_lines_and_bom_has_no_problems(tmp_path):
    path = tmp_path / "x.txt"
    path.write_bytes(b"\xef\xbb\xbf" + (BOX + "\n1 0.1 0.1 1.0 1\n").encode())
    assert check_label_file(path, num_classes=2) == []


def test_image_too_small_or_over_pixel_limit(tmp_path):
    # given an 8x8 image and a 40x30 one
    small = write_image(tmp_path / "small.png", 1, size=(8, 8), fmt="PNG")
    big = write_image(tmp_path / "big.png", 2, size=(40, 30), fmt="PNG")
    # when checked, then too small is a problem, and over the limit is one (PIL warning or error)
    assert "smaller than 10 px" in check_image(small)[0]
    assert "too large" in check_image(big, max_pixels=1000)[0]  # 1200 px: PIL's warning range
    assert "too large" in check_image(big, max_pixels=500)[0]  # > 2x limit: PIL's error range
    assert check_image(big) == []
    # and PIL's global settings are restored
    assert Image.MAX_IMAGE_PIXELS == 89_478_485 and ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_unsupported_formats(tmp_path):
    # given a GIF named .gif and a GIF named .png
    gif = tmp_path / "a.gif"
    Image.new("RGB", (16, 16)).save(gif, "GIF")
    disguised = tmp_path / "b.png"
    shutil.copyfile(gif, disguised)
    # when checked, then both are problems
    assert "unsupported format '.gif'" in check_image(gif)[0]
    assert "content is GIF" in check_image(disguised)[0]


def test_unsupported_file_in_split_folder_is_refused(tmp_path, cfg):
    ds = make_dataset(tmp_path / "src")
    Image.new("RGB", (16, 16)).save(ds / "images/train/z.gif", "GIF")
    assert_problem(refused(ds, cfg), str(ds / "images/train/z.gif"), "unsupported format")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("names: [a, b]\ntrain: images/train\nval: images/val\n", "key 'test' is missing"),
        ("train: images/train\nval: images/val\ntest: images/test\n", "key 'names' is missing"),
        ("names: [a, b\n", "invalid YAML"),
        ("names: [a, b]\ntrain: images/train\nval: images/no\ntest: images/test\n", "images/no does not exist"),
        ("names: {0: a, 2: b}\ntrain: images/train\nval: images/val\ntest: images/test\n", "ids must be 0..1"),
        ("names: [a, no]\ntrain: images/train\nval: images/val\ntest: images/test\n", "names[1] = False"),
    ],
)
def test_data_yaml_problems(tmp_path, cfg, data, expected):
    ds = make_dataset(tmp_path / "src")
    (ds / "data.yaml").write_text(data)
    assert_problem(refused(ds, cfg), str(ds / "data.yaml"), expected)


def test_label_path_follows_ultralytics_convention():
    assert label_path_for("/d/images/train/sub/a.b.jpg") == Path("/d/labels/train/sub/a.b.txt")
    assert label_path_for("/d/train/a.png") == Path("/d/train/a.txt")


@pytest.mark.integration
def test_conventions_match_the_pinned_ultralytics(tmp_path, cfg, anchor, monkeypatch):
    # given the pinned Ultralytics (slow to import: torch, hence the integration marker)
    utils = pytest.importorskip("ultralytics.data.utils")
    # then it loads the same image formats and finds labels where we do
    assert set(IMG_FORMATS) == set(utils.IMG_FORMATS)
    image = "/d/images/train/sub/a.b.jpg"
    assert str(label_path_for(image)) == utils.img2label_paths([image])[0]
    # and it reads an imported anchor's data.yaml from any working directory
    import_anchor(make_dataset(tmp_path / "src"), cfg)
    monkeypatch.chdir(tmp_path)
    data = utils.check_det_dataset(str(anchor / "data.yaml"), autodownload=False)
    assert data["train"] == str(anchor / "images" / "train") and data["names"] == {0: "cat", 1: "dog"}
