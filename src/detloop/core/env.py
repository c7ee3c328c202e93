"""Process environment for offline, quiet, project-contained runs.

Runs on ``import detloop``, before Ultralytics, MLflow, FiftyOne or DVC are imported: it points
Ultralytics at a project-owned config dir with a local font (so plots never try a download),
switches telemetry off and bounds MLflow's HTTP retries (:data:`TRACKING_HTTP`). Values the user
already set in the environment win. Ultralytics' own settings (its MLflow callback off) are applied
in :mod:`detloop.model.yolo`, where it is imported.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

TELEMETRY_OFF = {
    "YOLO_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "FIFTYONE_DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",
    "HYDRA_FULL_ERROR": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}

# MLflow retries a failed HTTP request 7 times with backoff factor 2 (about four minutes) and waits up to
# 120 s for each answer, so a tracking server that went away would stall a stage for minutes. detloop
# fails fast instead (exit 3, TrackingUnavailable naming the URI): 3 retries after 0, 2 and 4 s (+ jitter,
# under 10 s in all) and 30 s per request. Set the variables yourself to tolerate longer outages.
TRACKING_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def project_root(start: Path | None = None) -> Path:
    """The project folder: ``DETLOOP_ROOT`` if set, else the nearest folder up with ``dvc.yaml``."""
    env = os.environ.get("DETLOOP_ROOT")
    if env:
        return Path(env).resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file() and (folder / "conf").is_dir():
            return folder
    return here


def in_project(value: str | Path, root: Path | None = None) -> Path:
    """``value`` (``~`` expanded) as an absolute path: a relative path is relative to the project root."""
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else (root or project_root()) / path


def _install_font(config_dir: Path) -> None:
    """Ultralytics plots look for Arial.ttf in its config dir and download it otherwise."""
    target = config_dir / "Arial.ttf"
    if target.exists():
        return
    try:
        import matplotlib

        source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    except ImportError:  # matplotlib is an Ultralytics dependency; without it there are no plots
        return
    if source.is_file():
        shutil.copyfile(source, target)


def prepare_environment(root: Path | None = None) -> Path:
    """Set telemetry-off variables, MLflow's HTTP retries and a project-owned ``YOLO_CONFIG_DIR``; return the root."""
    root = root or project_root()
    for key, value in {**TELEMETRY_OFF, **TRACKING_HTTP}.items():
        os.environ.setdefault(key, value)
    if "YOLO_CONFIG_DIR" not in os.environ:
        config_dir = root / "build" / "ultralytics"
        os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
    # Ultralytics keeps settings.json and fonts in <YOLO_CONFIG_DIR>/Ultralytics
    folder = Path(os.environ["YOLO_CONFIG_DIR"]) / "Ultralytics"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _install_font(folder)
    except OSError:  # read-only location: Ultralytics falls back to a temp dir of its own
        pass
    return root


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a local server the project starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def package_version(name: str) -> str:
    """An installed distribution's version (``''`` when it is not installed), without importing it."""
    try:
        return version(name)
    except PackageNotFoundError:
        return ""


def gpu_possible() -> bool:
    """Whether torch could find a GPU here, told without importing torch (about a second per process).

    A CUDA build of torch sees a GPU only through the NVIDIA driver's library, so where ``libcuda``
    (``nvcuda`` on Windows) cannot be loaded there is none; a ROCm build, or a process that already
    imported torch, asks torch itself (True here means: ask torch).
    """
    if "torch" in sys.modules or "rocm" in package_version("torch"):
        return True
    if sys.platform == "darwin":
        return False
    try:
        ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
    except OSError:
        return False
    return True
