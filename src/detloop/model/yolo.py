"""The one place Ultralytics is imported: offline settings, model loading, device facts."""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import detloop  # noqa: F401  (sets YOLO_CONFIG_DIR and telemetry variables before Ultralytics loads)
from detloop.core.errors import BadInput

log = logging.getLogger(__name__)

# Ultralytics' MLflow callback would open a second store (./mlflow.db, ./mlruns) and log weights as
# plain artifacts; detloop logs to the configured store itself, so every integration is off.
ULTRALYTICS_SETTINGS = {
    "mlflow": False,
    "sync": False,
    "tensorboard": False,
    "wandb": False,
    "clearml": False,
    "comet": False,
    "dvc": False,
    "raytune": False,
}

ARCH_SUFFIXES = (".yaml", ".yml")


def ultralytics():
    """Import Ultralytics with detloop's settings applied (idempotent)."""
    import ultralytics as ul
    from ultralytics.utils import SETTINGS

    from detloop.core.env import project_root

    build = project_root() / "build"
    wanted = {
        **ULTRALYTICS_SETTINGS,
        "runs_dir": str(build / "runs"),
        "weights_dir": str(build / "weights"),
        "datasets_dir": str(build / "datasets"),
    }
    changed = {k: v for k, v in wanted.items() if k in SETTINGS and SETTINGS.get(k) != v}
    if changed:
        SETTINGS.update(changed)
    return ul


def load_model(spec: str | Path):
    """A YOLO model from an architecture yaml (untrained) or a local ``.pt`` file.

    A bare weights name that is not a local file (e.g. ``yolov8n.pt``) would make Ultralytics
    download it; detloop never downloads, so that is refused with a clear message.
    """
    spec = str(spec)
    path = Path(spec).expanduser()
    if spec.endswith(ARCH_SUFFIXES):
        if not path.exists() and "/" in spec:
            raise BadInput(f"architecture yaml not found: {spec}")
    elif not path.is_file():
        raise BadInput(
            f"model weights not found: {spec}",
            [
                f"base.model={spec} is not a local file; detloop does not download weights. "
                "Give the path of a .pt file you have (e.g. base.model=/models/yolov8n.pt) "
                "or an architecture yaml to train from scratch (e.g. base.model=yolov8n.yaml)."
            ],
        )
    return ultralytics().YOLO(str(path) if path.exists() else spec)


def device_info() -> dict[str, str]:
    """What a run trained on: GPU names and memory when CUDA is present, else the CPU."""
    import os

    import torch

    info = {"device.torch": torch.__version__, "device.cuda_available": str(torch.cuda.is_available())}
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        props = [torch.cuda.get_device_properties(i) for i in range(count)]
        info.update(
            {
                "device.type": "cuda",
                "device.count": str(count),
                "device.name": ", ".join(p.name for p in props),
                "device.memory_gb": ", ".join(f"{p.total_memory / 1e9:.1f}" for p in props),
            }
        )
    else:
        info.update(
            {
                "device.type": "cpu",
                "device.count": "1",
                "device.name": platform.processor() or platform.machine(),
                "device.cpu_count": str(os.cpu_count()),
                "device.memory_gb": f"{_total_memory_gb():.1f}",
            }
        )
    return info


def _total_memory_gb() -> float:
    try:
        import psutil

        return psutil.virtual_memory().total / 1e9
    except ImportError:
        return 0.0
