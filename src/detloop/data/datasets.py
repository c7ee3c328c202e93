"""The data sets training and evaluation read: the anchor's splits and class names, and the Ultralytics
data yaml over image lists that every training run gets (absolute paths, written in the run's folder)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from omegaconf import DictConfig

from detloop.core.config import resolve_path
from detloop.core.errors import BadInput
from detloop.data.yolo_format import is_image_name


def anchor_names(anchor: Path) -> dict[int, str]:
    """Class names of the anchor dataset, from its data.yaml."""
    path = anchor / "data.yaml"
    if not path.is_file():
        raise BadInput(
            f"no anchor dataset at {anchor}",
            [f"{path}: missing; run `detloop demo-data` or `detloop anchor import PATH` first"],
        )
    names = (yaml.safe_load(path.read_text()) or {}).get("names")
    if isinstance(names, list):
        names = dict(enumerate(names))
    if not isinstance(names, dict) or not names:
        raise BadInput(f"{path}: key 'names' is missing or empty")
    return {int(k): str(v) for k, v in names.items()}


def anchor_yaml(cfg: DictConfig, out_dir: Path) -> Path:
    """An Ultralytics data yaml with absolute paths to the anchor's splits, written in ``out_dir``."""
    anchor = resolve_path(cfg, "anchor")
    names = anchor_names(anchor)
    spec = {
        "path": str(anchor),
        "train": "images/train",
        "val": "images/val",
        "test": "images/test",
        "names": names,
    }
    path = out_dir / "data.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def count_images(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.is_file()) if folder.is_dir() else 0


def anchor_images(anchor: Path, split: str) -> list[Path]:
    """The image files under ``anchor/images/<split>`` (sub-folders included), in path order.

    Same files and order as ``sorted(rglob("*"))`` keeping image files (symlinked folders are not
    entered), at a fraction of the cost on large splits: one ``scandir`` per folder, no stat per file
    where the file system reports the entry type, and plain string sorting.
    """
    folder = anchor / "images" / split
    if not folder.is_dir():
        return []
    found: list[tuple[str, ...]] = []
    pending: list[tuple[str, tuple[str, ...]]] = [(str(folder), ())]
    while pending:
        directory, parts = pending.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.is_dir() and not entry.is_symlink():
                    pending.append((entry.path, (*parts, entry.name)))
                elif entry.is_file() and is_image_name(entry.name):
                    found.append((*parts, entry.name))
    found.sort()  # by path components, as Path ordering is
    return [folder.joinpath(*parts) for parts in found]


def write_data_yaml(out: Path, names: dict[int, str], splits: dict[str, list[Path]]) -> Path:
    """``out/data.yaml`` naming ``out/<split>.txt`` lists of absolute image paths (one per split)."""
    out.mkdir(parents=True, exist_ok=True)
    spec: dict = {"names": names}
    for split, images in splits.items():
        path = out / f"{split}.txt"
        path.write_text("".join(f"{Path(p).resolve()}\n" for p in images))
        spec[split] = str(path)
    data_yaml = out / "data.yaml"
    data_yaml.write_text(yaml.safe_dump(spec, sort_keys=False))
    return data_yaml
