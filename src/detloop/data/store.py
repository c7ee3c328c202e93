"""Storage rules every writer of ``data/`` follows: file names, one writer at a time, durable renames,
timestamps, and recording the new data version with DVC."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from omegaconf import DictConfig

from detloop.core.config import resolve_path
from detloop.core.env import project_root
from detloop.data.manifest import fsync_file
from detloop.data.yolo_format import is_image_name

log = logging.getLogger(__name__)


TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # UTC, as in the demo manifests: 2025-01-06T13:55:11Z


REJECTED_MANIFEST = "rejected.jsonl"


REJECTED_DIR = "rejected"


def utc_now() -> str:
    """The current UTC time as ``2025-01-06T13:55:11Z``."""
    return datetime.now(UTC).strftime(TIME_FORMAT)


def find_image(folder: Path, sample_id: str) -> Path | None:
    """The image file ``<folder>/<id>.<image suffix>``, or None."""
    found = [Path(p) for p in glob.glob(glob.escape(str(folder / sample_id)) + ".*") if is_image_name(Path(p))]
    return sorted(found)[0] if found else None


def fsync_dir(folder: Path) -> None:
    """Make renames in ``folder`` durable (no-op when it does not exist)."""
    if folder.is_dir():
        fsync_file(folder)


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` (created if missing) for one writer of the inbox at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another detloop process writing %s", folder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@dataclass(frozen=True)
class DvcData:
    """The data folder as DVC tracks it: the project root, the folder relative to it and its ``.dvc`` file."""

    root: Path
    relative: str  # e.g. "data"
    dvc_file: Path  # e.g. <root>/data.dvc

    def version(self) -> str | None:
        """The md5 that the ``.dvc`` file records now (``<hex>.dir``), or None when it has none."""
        if not self.dvc_file.is_file():
            return None
        return _dvc_md5(self.dvc_file) or None


def dvc_data(cfg: DictConfig, skipped: str | None = None) -> DvcData | None:
    """``paths.data`` as DVC tracks it, or None when it is outside the project (e.g. tests with temporary
    data) or has no ``.dvc`` file in the project root; then the reason is logged after ``skipped`` (at
    INFO; at DEBUG without ``skipped``)."""
    level, what = (logging.INFO, skipped) if skipped else (logging.DEBUG, "not tracked by DVC")
    root = project_root().resolve()
    data = resolve_path(cfg, "data").resolve()
    if not data.is_relative_to(root) or data == root:
        log.log(level, "%s: %s is not a folder inside the project %s", what, data, root)
        return None
    relative = data.relative_to(root).as_posix()
    dvc_file = root / f"{relative}.dvc"
    if not dvc_file.is_file():
        log.log(level, "%s: %s does not exist (not tracked by DVC)", what, dvc_file)
        return None
    return DvcData(root, relative, dvc_file)


def record_data_version(cfg: DictConfig) -> str | None:
    """``dvc add <paths.data>`` when the project tracks that folder (``<data>.dvc`` in the project root).

    Returns the new md5 recorded in the .dvc file, or None when skipped (data outside the project,
    e.g. tests with temporary data, or no .dvc file). Raises RuntimeError when dvc fails: the data
    change itself is complete; the message says how to record the version by hand. Waits for DVC's
    lock when another DVC process (a push of the previous version) holds it.
    """
    target = dvc_data(cfg, skipped="data version not recorded")
    if target is None:
        return None
    root, relative = target.root, target.relative
    log.info("recording the new data version: dvc add %s (in %s)", relative, root)
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "--wait-for-lock", "add", "-q", relative],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"`dvc add {relative}` failed (exit {done.returncode}): "
            f"{(done.stderr or done.stdout).strip()}\nthe data change is complete; "
            f"record it by hand: cd {root} && dvc add {relative}"
        )
    md5 = _dvc_md5(target.dvc_file)
    log.info("data version %s recorded in %s", md5, target.dvc_file.name)
    return md5


def _dvc_md5(dvc_file: Path) -> str:
    import yaml

    outs = (yaml.safe_load(dvc_file.read_text(encoding="utf-8")) or {}).get("outs") or [{}]
    return str(outs[0].get("md5", ""))
