"""The one place Ultralytics is imported: offline settings, model loading, device facts."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import detloop  # noqa: F401  (sets YOLO_CONFIG_DIR and telemetry variables before Ultralytics loads)
from detloop.core.env import gpu_possible, package_version
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


def device_info(device: str | None = None) -> dict[str, str]:
    """What a run uses, as ``device.*`` tags (plus ``device``: ``cpu``, ``cuda:0`` or ``cuda:0,1``).

    ``device`` is named as Ultralytics names it (``cpu``, ``0``, ``0,1``, ``cuda:0``); None means every
    visible GPU, else the CPU. GPUs: names, memory, CUDA runtime, cuDNN and driver versions. Always the
    CPU model, cores and torch threads; on the CPU also ``device.amp=false`` (Ultralytics never uses AMP
    there). Never fails on a CPU-only machine.
    """
    if not gpu_possible():
        # no GPU to name: the CPU's facts without importing torch into a process that does not use it
        # (its threads are recorded where torch runs)
        info = {
            "device.torch": _torch_version(),
            "device.cuda_available": "False",
            "device.cpu": _cpu_model(),
            "device.cpu_count": str(os.cpu_count()),
        }
        return {**info, **_cpu_device(info, device)}
    import torch

    info = {
        "device.torch": torch.__version__,
        "device.cuda_available": str(torch.cuda.is_available()),
        "device.cpu": _cpu_model(),
        "device.cpu_count": str(os.cpu_count()),
        "device.threads": str(torch.get_num_threads()),
    }
    if torch.cuda.is_available():
        info.update(
            {
                "device.visible_count": str(torch.cuda.device_count()),
                "device.cuda": str(torch.version.cuda or torch.version.hip or ""),
                "device.cudnn": str(torch.backends.cudnn.version() or ""),
                "device.driver": _driver_version(),
            }
        )
    indices = _cuda_indices(device)
    if indices:
        props = [torch.cuda.get_device_properties(i) for i in indices]
        info.update(
            {
                "device": "cuda:" + ",".join(str(i) for i in indices),
                "device.type": "cuda",
                "device.count": str(len(indices)),
                "device.name": ", ".join(p.name for p in props),
                "device.memory_gb": ", ".join(f"{p.total_memory / 1e9:.1f}" for p in props),
            }
        )
    else:
        info.update(_cpu_device(info, device))
    return info


def _torch_version() -> str:
    """``torch.__version__`` read from torch's ``version.py`` (with its build tag, e.g. ``+cu130``) unimported."""
    spec = importlib.util.find_spec("torch")
    if spec is not None and spec.origin:
        with contextlib.suppress(OSError):
            found = re.search(
                r"__version__\s*=\s*['\"]([^'\"]+)['\"]", (Path(spec.origin).parent / "version.py").read_text()
            )
            if found:
                return found.group(1)
    return package_version("torch")


def _cpu_device(info: dict[str, str], device: str | None) -> dict[str, str]:
    kind = "mps" if str(device or "").startswith("mps") else "cpu"  # Apple's GPU shares the CPU's memory
    return {
        "device": kind,
        "device.type": kind,
        "device.count": "1",
        "device.name": info["device.cpu"],
        "device.memory_gb": f"{_total_memory_gb():.1f}",
        "device.amp": "false",
    }


def _cuda_indices(device: str | None) -> list[int]:
    """The visible CUDA indices ``device`` names (every one for None; none for the CPU or without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    if device is None:
        return list(range(count))
    text = str(device).lower().replace("cuda:", "").replace(" ", "")
    if text in ("", "cuda"):
        return [torch.cuda.current_device()]
    return [int(part) for part in text.split(",") if part.isdigit() and int(part) < count]


def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def _driver_version() -> str:
    """The NVIDIA driver version from ``nvidia-smi``, else from ``pynvml`` if installed ('unknown' otherwise)."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout
        except (OSError, subprocess.SubprocessError) as err:
            log.debug("nvidia-smi gave no driver version: %s", err)
        else:
            versions = sorted({line.strip() for line in out.splitlines() if line.strip()})
            if versions:
                return ", ".join(versions)
    try:
        import pynvml
    except ImportError:
        return "unknown"
    try:
        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
    except Exception as err:  # pynvml raises its own NVMLError family (no driver, no library)
        log.debug("pynvml gave no driver version: %s", err)
        return "unknown"
    return version.decode() if isinstance(version, bytes) else str(version)


def _total_memory_gb() -> float:
    try:
        import psutil

        return psutil.virtual_memory().total / 1e9
    except ImportError:
        return 0.0


# ------------------------------------------------------------------ what an Ultralytics training used


def trained_on(trainer) -> str:
    """The device of an Ultralytics trainer as :func:`device_info` takes it: ``cpu`` (or ``mps``), or the
    CUDA indices of every rank (``0`` or, in a DDP worker, the whole ``0,1``)."""
    device = trainer.device
    if device.type != "cuda":
        return device.type
    requested = str(getattr(trainer.args, "device", "") or "")
    if getattr(trainer, "world_size", 0) > 1 and "," in requested:
        return requested
    return str(device.index) if device.index is not None else ""


def training_device_info(trainer) -> dict[str, str]:
    """:func:`device_info` of the devices a trainer uses, with AMP as it actually runs (``trainer.amp``
    after Ultralytics' own check: ``false`` on the CPU or when the check failed, ``bf16`` or ``true``)."""
    info = device_info(trained_on(trainer))
    amp = bool(getattr(trainer, "amp", False))
    info["device.amp"] = ("bf16" if str(trainer.args.amp) == "bf16" else "true") if amp else "false"
    info["device.world_size"] = str(max(int(getattr(trainer, "world_size", 1) or 1), 1))
    return info


def reset_peak_memory(trainer) -> None:
    """Start counting this process's peak GPU memory from here (nothing on the CPU)."""
    import torch

    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(trainer.device)


def peak_memory_gb(trainer) -> dict[int, float]:
    """This process's peak allocated memory on its training GPU, ``{cuda index: GB}`` ({} on the CPU)."""
    import torch

    device = trainer.device
    if device.type != "cuda":
        return {}
    index = device.index if device.index is not None else torch.cuda.current_device()
    return {index: torch.cuda.max_memory_allocated(device) / 1e9}


def merge_ranks(local: dict[int, float]) -> dict[int, float]:
    """Every DDP rank's ``local`` figures merged (the largest per key); ``local`` itself outside DDP.

    A collective inside an initialised process group: every rank must call it at the same point.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return dict(local)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    merged: dict[int, float] = {}
    for part in gathered:
        for key, value in (part or {}).items():
            merged[key] = max(value, merged.get(key, value))
    return merged
