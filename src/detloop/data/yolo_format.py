"""Validation of Ultralytics-format detection data: data.yaml, images and YOLO txt labels.

Every check returns a list of problems (strings naming the file, and the line where there is one)
instead of raising, so that callers (anchor import, inbox and pool imports) can collect all problems
of a data set and report them at once. The rules follow the pinned Ultralytics release
(``ultralytics.data.utils.verify_image_label``) where it is strict, and are stricter where it
silently repairs or drops data (coordinate tolerance, JPEG repair, ignored files).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import math
import os
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# Image suffixes (lower case, no dot) Ultralytics 8.4.190 loads: ultralytics.data.utils.IMG_FORMATS.
IMG_FORMATS = frozenset(
    {"avif", "bmp", "dng", "heic", "heif", "jp2", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp"}
)
# PIL ``Image.format`` values Ultralytics accepts (its IMG_FORMATS plus "jpeg2000").
PIL_FORMATS = IMG_FORMATS | {"jpeg2000"}
MIN_SIDE = 10  # px; Ultralytics refuses images with a side < 10 px
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default Image.MAX_IMAGE_PIXELS
LABEL_FIELDS = 5  # class xc yc w h
IGNORED_LABEL_FILES = frozenset({"classes.txt"})  # LabelImg / YOLO-mark write the class list here

_PIL_LOCK = threading.Lock()


@dataclass(frozen=True)
class DataSpec:
    """A parsed Ultralytics data.yaml: dataset root, class names and the source of each split.

    A split source is an image folder or a ``.txt`` file listing image paths.
    """

    yaml_path: Path
    root: Path
    names: dict[int, str]
    splits: dict[str, Path]

    @property
    def num_classes(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class Box:
    """One YOLO label row: class id and normalized centre x, centre y, width, height."""

    cls: int
    xc: float
    yc: float
    w: float
    h: float


# --------------------------------------------------------------------------- data.yaml


def find_data_yaml(source: Path) -> Path:
    """``source`` itself if it is a file, else ``source/data.yaml``."""
    return source / "data.yaml" if source.is_dir() else source


def inspect_data_yaml(path: str | Path) -> tuple[DataSpec | None, list[str]]:
    """Parse a data.yaml; return the spec (None when unusable) and every problem found.

    A relative ``path:`` is relative to the yaml's own folder (not the CWD, unlike Ultralytics);
    no ``path:`` means the yaml's folder. Splits train, val and test are required.
    """
    path = Path(os.path.abspath(Path(path).expanduser()))
    data, problems = _read_yaml_mapping(path)
    if data is None:
        return None, problems
    names, name_problems = parse_names(data, path)
    root = _dataset_root(data, path)
    splits, split_problems = _split_sources(data, root, path)
    problems += name_problems + split_problems
    if names is None or len(splits) < len(SPLITS):
        return None, problems
    return DataSpec(yaml_path=path, root=root, names=names, splits=splits), problems


def load_data_yaml(path: str | Path) -> DataSpec:
    """The spec of a data.yaml; raises BadInput listing every problem with it."""
    from detloop.core.errors import BadInput

    spec, problems = inspect_data_yaml(path)
    if problems or spec is None:
        raise BadInput(f"{path}: not a usable Ultralytics data.yaml", problems)
    return spec


def _read_yaml_mapping(path: Path) -> tuple[dict | None, list[str]]:
    import yaml

    if not path.is_file():
        what = "is a folder, not a data.yaml file" if path.is_dir() else "does not exist"
        return None, [f"{path}: {what}"]
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as err:
        return None, [f"{path}: not UTF-8 text ({err.reason} at byte {err.start})"]
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        reason = getattr(err, "problem", None) or str(err)
        return None, [f"{where}: invalid YAML ({reason})"]
    if not isinstance(data, dict):
        return None, [f"{path}: expected a mapping with names and train/val/test, got {type(data).__name__}"]
    return data, []


def parse_names(data: dict, yaml_path: Path) -> tuple[dict[int, str] | None, list[str]]:
    """``names`` (a list, or a {id: name} dict with ids 0..n-1) as {int: str}, and its problems."""
    raw = data.get("names")
    if raw is None:
        return None, [f"{yaml_path}: key 'names' is missing (a list of class names or a {{id: name}} map)"]
    if isinstance(raw, list):
        items = list(enumerate(raw))
    elif isinstance(raw, dict):
        items = list(raw.items())
    else:
        return None, [f"{yaml_path}: 'names' must be a list or a {{id: name}} map, got {type(raw).__name__}"]
    if not items:
        return None, [f"{yaml_path}: 'names' is empty"]
    names, problems = _names_from_items(items, yaml_path)
    nc = data.get("nc")
    if nc is not None and nc != len(items):
        problems.append(f"{yaml_path}: 'nc: {nc}' does not match the {len(items)} entries of 'names'")
    return (names if not problems else None), problems


def _names_from_items(items: list[tuple], yaml_path: Path) -> tuple[dict[int, str], list[str]]:
    names: dict[int, str] = {}
    problems: list[str] = []
    for key, value in items:
        cls = _as_class_id(key)
        if cls is None:
            problems.append(f"{yaml_path}: names key {key!r} is not a class id (an integer >= 0)")
            continue
        if isinstance(value, bool) or not isinstance(value, str | int | float) or str(value).strip() == "":
            problems.append(f"{yaml_path}: names[{cls}] = {value!r} is not a class name (quote it)")
            continue
        names[cls] = str(value)
    if not problems and sorted(names) != list(range(len(items))):
        problems.append(f"{yaml_path}: names ids must be 0..{len(items) - 1}, got {sorted(names)}")
    return dict(sorted(names.items())), problems


def _as_class_id(key: object) -> int | None:
    if isinstance(key, bool):
        return None
    if isinstance(key, int):
        return key if key >= 0 else None
    if isinstance(key, str) and key.strip().isdigit():
        return int(key)
    return None


def _dataset_root(data: dict, yaml_path: Path) -> Path:
    """``path:`` resolved against the yaml's folder; the folder itself when absent."""
    value = data.get("path")
    if value in (None, ""):
        return yaml_path.parent
    root = Path(str(value)).expanduser()
    return Path(os.path.abspath(root if root.is_absolute() else yaml_path.parent / root))


def _split_sources(data: dict, root: Path, yaml_path: Path) -> tuple[dict[str, Path], list[str]]:
    splits: dict[str, Path] = {}
    problems: list[str] = []
    for split in SPLITS:
        value = data.get(split)
        if value in (None, ""):
            problems.append(f"{yaml_path}: key '{split}' is missing (train, val and test are all required)")
        elif not isinstance(value, str):
            problems.append(
                f"{yaml_path}: '{split}' must be one folder or .txt list (got {type(value).__name__}); "
                "merge multiple sources into one"
            )
        else:
            source = Path(os.path.abspath(root / Path(value).expanduser()))
            splits[split] = source
            problems += _split_source_problems(split, source, yaml_path)
    return splits, problems


def _split_source_problems(split: str, source: Path, yaml_path: Path) -> list[str]:
    if source.suffix.lower() == ".txt":
        return [] if source.is_file() else [f"{yaml_path}: '{split}' list {source} does not exist"]
    return [] if source.is_dir() else [f"{yaml_path}: '{split}' folder {source} does not exist"]


# --------------------------------------------------------------------------- image lists


def is_image_name(path: str | Path) -> bool:
    """True when the suffix is one Ultralytics loads as an image (a path or a bare file name)."""
    return os.path.splitext(os.path.basename(path))[1][1:].lower() in IMG_FORMATS


def label_path_for(image: str | Path) -> Path:
    """The label file of an image, by Ultralytics' rule: last ``/images/`` -> ``/labels/``, suffix .txt."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return Path(sb.join(os.fspath(image).rsplit(sa, 1)).rsplit(".", 1)[0] + ".txt")


def image_dir_for(label: str | Path) -> Path:
    """The folder where the image of a label file would be (inverse of :func:`label_path_for`)."""
    sa, sb = f"{os.sep}labels{os.sep}", f"{os.sep}images{os.sep}"
    return Path(sb.join(os.fspath(label).rsplit(sa, 1))).parent


def list_split_images(source: Path) -> tuple[list[Path], list[str]]:
    """The images of one split (a folder, searched recursively, or a .txt list) and its problems."""
    if source.suffix.lower() == ".txt" and source.is_file():
        return _images_from_list(source)
    if not source.is_dir():
        return [], [f"{source}: split folder does not exist"]
    images: list[Path] = []
    problems: list[str] = []
    for path in _visible_files(source):
        if is_image_name(path):
            images.append(path)
        elif not (path.suffix == ".txt" and label_path_for(path) == path):  # labels kept beside images
            problems.append(
                f"{path}: unsupported format {path.suffix or '(no suffix)'!r} "
                f"(images must be one of: {', '.join(sorted(IMG_FORMATS))})"
            )
    return images, problems


def _visible_files(folder: Path) -> Iterator[Path]:
    """Files under ``folder``, sorted, skipping hidden files and folders (.DS_Store, .ipynb_checkpoints)."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts):
            yield path


def _images_from_list(list_file: Path) -> tuple[list[Path], list[str]]:
    """Image paths from a .txt list; relative lines are relative to the list's folder."""
    images: list[Path] = []
    problems: list[str] = []
    for number, line in enumerate(list_file.read_text(encoding="utf-8-sig").splitlines(), start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = Path(os.path.abspath(list_file.parent / Path(entry).expanduser()))
        if not is_image_name(path):
            problems.append(f"{list_file}:{number}: {entry!r} has an unsupported image format")
        elif not path.is_file():
            problems.append(f"{list_file}:{number}: image {path} does not exist")
        else:
            images.append(path)
    return images, problems


def orphan_labels(images: list[Path], label_roots: list[Path]) -> list[str]:
    """Problems for label files under ``label_roots`` whose image does not exist.

    A label whose image exists but is not among ``images`` (e.g. left out of a .txt list) is skipped.
    """
    expected = {label_path_for(image) for image in images}
    folders = set(label_roots) | {label.parent for label in expected}
    problems = []
    for label in sorted({p for folder in folders if folder.is_dir() for p in _label_files(folder)}):
        if label in expected or label.name in IGNORED_LABEL_FILES:
            continue
        if _image_exists_for(label):
            log.info("%s: its image is in no split; not imported", label)
        else:
            problems.append(f"{label}: label file without an image (looked in {image_dir_for(label)})")
    return problems


def _label_files(folder: Path) -> Iterator[Path]:
    return (p for p in _visible_files(folder) if p.suffix == ".txt")


def _image_exists_for(label: Path) -> bool:
    pattern = glob.escape(str(image_dir_for(label) / label.stem)) + ".*"
    return any(is_image_name(Path(p)) for p in glob.glob(pattern))


# --------------------------------------------------------------------------- images


def check_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> list[str]:
    """Problems with one image file: not decodable, truncated, unsupported format, too small or too big.

    ``max_pixels`` (None: no limit) replaces PIL's decompression-bomb limit for this check; PIL's
    warning and error for oversized images become problems.
    """
    path = Path(path)
    if not is_image_name(path):
        return [f"{path}: unsupported format {path.suffix!r} (images must be one of: {', '.join(sorted(IMG_FORMATS))})"]
    try:
        with strict_pil(max_pixels):
            fmt, size = _decode(path)
    except _bomb_errors() as err:
        return [f"{path}: image too large ({err}); the limit is yolo_format.max_pixels={max_pixels}"]
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError ...) for bad files
        return [f"{path}: cannot be decoded ({type(err).__name__}: {err})"]
    return _format_problems(path, fmt, size)


def _decode(path: Path) -> tuple[str, tuple[int, int]]:
    """Verify, then fully decode the image; return PIL's format name and (width, height)."""
    from PIL import Image

    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        im.load()
        return str(im.format or ""), im.size


def _format_problems(path: Path, fmt: str, size: tuple[int, int]) -> list[str]:
    problems = []
    if fmt.lower() not in PIL_FORMATS:
        problems.append(f"{path}: content is {fmt or 'unknown'}, not a supported image format")
    if min(size) < MIN_SIDE:
        problems.append(f"{path}: image is {size[0]}x{size[1]} px, smaller than {MIN_SIDE} px a side")
    if fmt.lower() in {"jpeg", "mpo"} and not _ends_with_jpeg_eoi(path):
        problems.append(f"{path}: JPEG is truncated (no end-of-image marker; Ultralytics would rewrite it)")
    return problems


def _ends_with_jpeg_eoi(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(-2, os.SEEK_END)
        return handle.read() == b"\xff\xd9"


def _bomb_errors() -> tuple[type[BaseException], ...]:
    from PIL import Image

    return (Image.DecompressionBombError, Image.DecompressionBombWarning)


@contextlib.contextmanager
def strict_pil(max_pixels: int | None) -> Iterator[None]:
    """PIL with our pixel limit, bomb warnings raised as errors and truncated images refused.

    PIL keeps these settings in module globals (and Ultralytics relaxes some of them), so they are
    set for the duration of one check under a lock and restored afterwards.
    """
    from PIL import Image, ImageFile

    with _PIL_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = max_pixels, False
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


# --------------------------------------------------------------------------- labels


def parse_label_file(path: str | Path, num_classes: int) -> tuple[list[Box], list[str]]:
    """The boxes of a YOLO detection label file and its problems (``file:line: what``).

    An empty file is a background image (no boxes, no problem). Blank lines are skipped, as
    Ultralytics does; a UTF-8 byte-order mark is accepted.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        return [], [f"{path}: not UTF-8 text ({err.reason} at byte {err.start})"]
    boxes: list[Box] = []
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        box, line_problems = parse_label_line(line, num_classes)
        problems += [f"{path}:{number}: {p}" for p in line_problems]
        if box is not None:
            boxes.append(box)
    return boxes, problems


def check_label_file(path: str | Path, num_classes: int) -> list[str]:
    """Problems with a YOLO detection label file, each as ``file:line: what is wrong``."""
    return parse_label_file(path, num_classes)[1]


def parse_label_line(line: str, num_classes: int) -> tuple[Box | None, list[str]]:
    """One ``class xc yc w h`` row as a Box (None when invalid) and what is wrong with it."""
    fields = line.split()
    if len(fields) != LABEL_FIELDS:
        return None, [_field_count_problem(len(fields))]
    values, problems = _numbers(fields)
    if problems:
        return None, problems
    cls, xc, yc, w, h = values
    if cls != int(cls) or not 0 <= cls < num_classes:
        problems.append(f"class id {fields[0]} is not an integer in [0, {num_classes})")
    for name, text, value in zip(("xc", "yc", "w", "h"), fields[1:], values[1:], strict=True):
        if name in ("w", "h") and value <= 0.0:
            problems.append(f"{name}={text} must be > 0")
        elif not 0.0 <= value <= 1.0:
            problems.append(f"{name}={text} is outside [0, 1] (coordinates must be normalized)")
    if problems:
        return None, problems
    return Box(int(cls), xc, yc, w, h), []


def _field_count_problem(count: int) -> str:
    text = f"{count} fields, expected {LABEL_FIELDS} (class xc yc w h)"
    if count > LABEL_FIELDS:
        text += "; segment/polygon or keypoint labels are not supported, only boxes"
    return text


def _numbers(fields: list[str]) -> tuple[list[float], list[str]]:
    values, problems = [], []
    for field in fields:
        try:
            value = float(field)
        except ValueError:
            problems.append(f"{field!r} is not a number")
            continue
        if not math.isfinite(value):
            problems.append(f"{field!r} is not a finite number")
        values.append(value)
    return values, problems
