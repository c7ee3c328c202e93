"""Content hashes, JSON-lines manifests and the fixed pool split."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

MANIFEST = "manifest.jsonl"  # the manifest of every data folder (anchor, pool, inbox)
CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_manifest(path: str | Path) -> list[dict]:
    """Rows of a JSON-lines manifest; a missing file is an empty manifest.

    Raises ValueError naming the file and line of a row that is not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def manifest_line(row: Mapping) -> str:
    """One manifest line: keys sorted, compact, so files are byte-deterministic."""
    return json.dumps(dict(row), sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"


def write_manifest(path: str | Path, rows: Iterable[Mapping]) -> None:
    """Write a whole manifest (for new datasets; the pool only ever appends)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(manifest_line(row) for row in rows)


def append_manifest(path: str | Path, rows: Iterable[Mapping]) -> None:
    """Append rows to a manifest, never rewriting what is there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.writelines(manifest_line(row) for row in rows)


def manifest_hash(path: str | Path) -> str:
    """sha256 of a manifest file ('' when it does not exist): the version of a dataset's contents."""
    path = Path(path)
    return sha256_file(path) if path.is_file() else ""


def split_for(sample_id: str, fractions: Mapping[str, float]) -> str:
    """The split of a pool sample, fixed once by hashing its id (no state, never changes).

    ``fractions`` maps split name -> share, e.g. {"train": 0.7, "val": 0.1, "holdout": 0.2};
    the order of the mapping is the order of the buckets.
    """
    total = sum(fractions.values())
    if total <= 0 or any(v < 0 for v in fractions.values()):
        raise ValueError(f"split fractions must be non-negative and sum > 0, got {dict(fractions)}")
    point = int(hashlib.sha256(sample_id.encode("utf-8")).hexdigest()[:15], 16) / float(16**15)
    edge = 0.0
    name = next(iter(fractions))
    for name, share in fractions.items():
        edge += share / total
        if point < edge:
            return name
    return name


def copy_atomic(source: Path, dest: Path, sha256: str | None = None) -> str:
    """Copy ``source`` to a temporary name beside ``dest`` (fsynced), then rename; return the sha256.

    Raises ValueError (nothing left behind) when ``sha256`` is given and the bytes no longer match it.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    digest = hashlib.sha256()
    try:
        with open(source, "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        if sha256 is not None and digest.hexdigest() != sha256:
            raise ValueError(
                f"{source} changed after it was checked (sha256 {digest.hexdigest()[:12]}, expected {sha256[:12]})"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return digest.hexdigest()


def fsync_file(path: Path) -> None:
    """Flush a written file to disk (so a manifest row never points at bytes still in a cache)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
