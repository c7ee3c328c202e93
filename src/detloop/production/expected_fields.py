"""The fields each scored image is expected to show (``monitor.detection_rate.expected``).

The detection rate of a field is measured over the images expected to show it: a receipt without a
stamp does not count against ``stamp``. An image is known by its sha256, which the prediction log
records for every scored image (``image_sha256``). The first source that knows an image decides:

1. ``file``: an expected-fields file, JSON lines, one image each, ``{"sha256": ..., "fields": [...]}``
   or ``{"sha256": ..., "page_type": ...}`` with the page type's fields in ``page_types``;
2. ``labelled``: human-labelled folders (``manifest.jsonl`` with ``sha256`` + YOLO ``labels/``, as the
   anchor, the pool and the verified A/B set are written): the classes of the image's labels;
3. ``unlisted``: every other image expects these fields (null = every monitored field).

Label files are read only for the images that were served, once each.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from detloop.core.config import resolve_path
from detloop.core.env import in_project
from detloop.core.errors import BadInput
from detloop.data.manifest import MANIFEST, read_manifest

KEY = "monitor.detection_rate.expected"
SOURCES = ("file", "labelled", "unlisted")
SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class Expectations:
    """Who expects what: ``of(sha256)`` gives an image's expected fields (monitored ones only) and the source."""

    monitored: tuple[str, ...]
    listed: dict[str, frozenset[str]] = field(default_factory=dict)  # sha256 -> fields, from the file
    labelled: dict[str, tuple[Path, dict]] = field(default_factory=dict)  # sha256 -> (folder, manifest row)
    unlisted: frozenset[str] = frozenset()
    names: dict[int, str] | None = None  # class id -> name for label files (the anchor data.yaml)
    _read: dict[str, frozenset[str]] = field(default_factory=dict)

    @property
    def per_image(self) -> bool:
        """True when some image has an expectation of its own (else every image expects ``unlisted``)."""
        return bool(self.listed or self.labelled)

    def of(self, sha256: str | None) -> tuple[frozenset[str], str]:
        if sha256 in self.listed:
            return self.listed[sha256], "file"
        if sha256 in self.labelled:
            if sha256 not in self._read:
                self._read[sha256] = self._label_fields(*self.labelled[sha256])
            return self._read[sha256], "labelled"
        return self.unlisted, "unlisted"

    def _label_fields(self, folder: Path, row: dict) -> frozenset[str]:
        """The monitored classes in the image's label file (none for a background image without one)."""
        from detloop.data.yolo_format import parse_label_file

        path = label_file(folder, row)
        if path is None:
            return frozenset()
        if self.names is None:
            raise BadInput(
                f"{KEY}.labelled: cannot name the classes of {path}: the anchor data.yaml is unusable",
                [f"fix the anchor's data.yaml (paths.anchor) or drop {folder} from {KEY}.labelled"],
            )
        boxes, problems = parse_label_file(path, len(self.names))
        if problems:
            raise BadInput(f"{KEY}.labelled: bad label file of a served image ({folder})", problems)
        return frozenset(self.names[b.cls] for b in boxes) & frozenset(self.monitored)


def label_file(folder: Path, row: dict) -> Path | None:
    """The YOLO label file of a manifest row: ``labels/<split>/<name>.txt`` (anchor) or ``labels/<id>.txt``."""
    sample = str(row.get("id", ""))
    candidates = []
    if row.get("split"):
        candidates.append(folder / "labels" / str(row["split"]) / f"{sample.rsplit('/', 1)[-1]}.txt")
    candidates.append(folder / "labels" / f"{sample}.txt")
    return next((p for p in candidates if p.is_file()), None)


def load(cfg: DictConfig, monitored: list[str], names: dict[int, str] | None) -> Expectations:
    """The configured expectations; BadInput names the key, file and line of anything wrong."""
    node = cfg.monitor.detection_rate.expected
    known = set(names.values()) if names else set(monitored)
    unlisted = _field_list(node.unlisted, f"{KEY}.unlisted", known, default=monitored)
    page_types = _page_types(node.page_types, known)
    expect = Expectations(tuple(monitored), unlisted=frozenset(unlisted) & frozenset(monitored), names=names)
    if node.file is not None:
        expect.listed = _read_file(in_project(str(node.file)), page_types, known, frozenset(monitored))
    folders = node.labelled if node.labelled is not None else []
    if not OmegaConf.is_list(folders):
        raise BadInput(f"{KEY}.labelled: expected a list of folders, got {folders!r}")
    for entry in folders:
        folder = in_project(str(entry))
        try:
            rows = read_manifest(folder / MANIFEST)
        except ValueError as err:
            raise BadInput(f"{KEY}.labelled: {err}") from err
        for row in rows:
            sha = str(row.get("sha256", "")).lower()
            if SHA256.match(sha) and row.get("has_labels", True) and sha not in expect.labelled:
                expect.labelled[sha] = (folder, row)
    return expect


def _field_list(value, key: str, known: set[str], default: list[str]) -> list[str]:
    if value is None:
        return list(default)
    if not OmegaConf.is_list(value) and not isinstance(value, list):
        raise BadInput(f"{key}: expected a list of field names or null, got {value!r}")
    names = [str(v) for v in value]
    unknown = sorted(set(names) - known)
    if unknown:
        raise BadInput(f"{key}: unknown field(s) {unknown}", [f"known fields: {', '.join(sorted(known))}"])
    return names


def _page_types(node, known: set[str]) -> dict[str, frozenset[str]]:
    if node is None:
        return {}
    if not OmegaConf.is_dict(node):
        raise BadInput(f"{KEY}.page_types: expected a mapping page type -> list of fields, got {node!r}")
    return {
        str(kind): frozenset(_field_list(fields, f"{KEY}.page_types.{kind}", known, default=[]))
        for kind, fields in node.items()
    }


def _read_file(
    path: Path, page_types: dict[str, frozenset[str]], known: set[str], monitored: frozenset[str]
) -> dict[str, frozenset[str]]:
    """sha256 -> expected fields of every row of the expected-fields file."""
    if not path.is_file():
        raise BadInput(f"{KEY}.file: {path} does not exist")
    listed: dict[str, frozenset[str]] = {}
    problems = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                problems.append(f"{where}: not valid JSON ({err.msg})")
                continue
            fields, problem = _row_fields(row, page_types, known)
            if problem:
                problems.append(f"{where}: {problem}")
            else:
                listed.setdefault(str(row["sha256"]).lower(), fields & monitored)
    if problems:
        raise BadInput(f"{KEY}.file: {len(problems)} bad row(s) in {path}", problems)
    return listed


def _row_fields(row, page_types: dict[str, frozenset[str]], known: set[str]) -> tuple[frozenset[str], str]:
    """A file row's fields, or the problem with it."""
    if not isinstance(row, dict) or not SHA256.match(str(row.get("sha256", "")).lower()):
        return frozenset(), 'expected {"sha256": "<64 hex digits>", "fields": [...] or "page_type": ...}'
    if "fields" in row:
        fields = row["fields"]
        if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
            return frozenset(), f"fields: expected a list of names, got {fields!r}"
        unknown = sorted(set(fields) - known)
        return frozenset(fields), f"unknown field(s) {unknown}" if unknown else ""
    kind = row.get("page_type")
    if kind is None:
        return frozenset(), "neither fields nor page_type"
    if str(kind) not in page_types:
        return frozenset(), f"page_type {kind!r} is not in {KEY}.page_types ({', '.join(page_types) or 'empty'})"
    return page_types[str(kind)], ""


def anchor_names(cfg: DictConfig) -> tuple[dict[int, str] | None, list[str]]:
    """Class id -> name of the anchor data.yaml (None and the problems when it is unusable)."""
    from detloop.data.yolo_format import inspect_data_yaml

    spec, problems = inspect_data_yaml(resolve_path(cfg, "anchor") / "data.yaml")
    return (dict(spec.names) if spec is not None else None), problems
