"""The inference runtime a registered version is served with: its ONNX export under ONNX Runtime.

Registration exports the trained ``.pt`` with Ultralytics' own ``export`` (format ``onnx``, dynamic batch
and image size, so a batch of equal-sized pages is letterboxed to the same rectangle as PyTorch does) and
logs the ``.onnx`` file with the version (artifact ``onnx`` of the pyfunc model). Serving, the gate's
served-model check and ``evaluator.predict`` load it through :func:`load_detector`, which runs it with
Ultralytics' predictor (the same letterbox, NMS and box scaling as the PyTorch model) on ONNX Runtime:
the CPU provider with ``threads`` intra-op threads (default: the CPUs this process may use; threads sleep
when idle rather than spin, so a busy server's other threads keep their core), or ONNX Runtime's CUDA
provider where a GPU is present and ``onnxruntime-gpu`` is installed (Ultralytics' choice).

``runtime`` in a model's config: ``auto`` (ONNX Runtime when the version holds an export and ONNX
Runtime is installed, else PyTorch), ``onnx`` (refuse to load without them) or ``torch``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from detloop.core.env import package_version
from detloop.core.errors import BadInput
from detloop.model.yolo import load_model

log = logging.getLogger(__name__)

ONNX_ARTIFACT = "onnx"
RUNTIMES = ("auto", "onnx", "torch")


ONNX_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")  # either installs the module ``onnxruntime``


def onnx_available() -> bool:
    """Whether ONNX Runtime is installed (found without importing it: the gate only reads cached passes)."""
    return importlib.util.find_spec("onnxruntime") is not None


def onnx_version() -> str:
    """The installed ONNX Runtime's version, from its distribution's metadata (no import)."""
    for dist in ONNX_DISTRIBUTIONS:
        if found := package_version(dist):
            return found
    import onnxruntime  # installed some other way (e.g. built from source)

    return str(onnxruntime.__version__)


def export_onnx(weights: str | Path, imgsz: int, dst: Path) -> Path:
    """``weights`` exported to ONNX at ``imgsz`` (dynamic shapes), written as ``dst/<stem>.onnx``.

    The export runs on the CPU (the file is the same whatever device trained the model) in a scratch
    copy, so nothing is written beside ``weights``."""
    dst.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="detloop-export-") as tmp:
        copy = Path(tmp) / Path(weights).name
        shutil.copyfile(weights, copy)
        model = load_model(copy)
        exported = model.export(
            format="onnx", imgsz=int(imgsz), dynamic=True, simplify=True, half=False, device="cpu", verbose=False
        )
        target = dst / (Path(weights).stem + ".onnx")
        shutil.move(str(exported), target)
    return target


def cpu_threads() -> int:
    """The CPUs this process may run on (its affinity, e.g. a SLURM or container limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def choose(runtime: str, onnx_file: Path | None) -> str:
    """``onnx`` or ``torch`` for a model config's ``runtime`` and the version's export (None: none)."""
    if runtime not in RUNTIMES:
        raise BadInput(
            f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}",
            ["the model config's 'runtime' (recorded from base.predict.runtime; serve.runtime overrides it)"],
        )
    if runtime == "torch":
        return "torch"
    if onnx_file is not None and onnx_available():
        return "onnx"
    if runtime == "onnx":
        why = "it holds no ONNX export" if onnx_file is None else "onnxruntime is not installed"
        raise BadInput(f"runtime 'onnx' asked for, but {why}", ["use runtime=auto or runtime=torch"])
    return "torch"


def load_detector(weights: str | Path, *, imgsz: int, device: str | None = None, threads: int | None = None):
    """A YOLO model for ``weights`` (``.pt`` or ``.onnx``), ready to predict.

    An ``.onnx`` file runs on ONNX Runtime with ``threads`` intra-op threads on the CPU (None: every CPU
    this process may use); its session is created by one warm-up prediction at ``imgsz``."""
    weights = Path(weights)
    if weights.suffix != ".onnx":
        return load_model(weights)
    from detloop.model.yolo import ultralytics

    model = ultralytics().YOLO(str(weights), task="detect")
    from PIL import Image

    model.predict(Image.new("RGB", (imgsz, imgsz)), imgsz=imgsz, device=device, verbose=False)
    backend = _onnx_backend(model)
    if backend is not None and backend.session.get_providers() == ["CPUExecutionProvider"]:
        backend.session = cpu_session(weights, threads)
    return model


def _onnx_backend(model):
    """Ultralytics' ONNX Runtime backend of a model that has predicted (None for PyTorch, or before)."""
    backend = getattr(getattr(model.predictor, "model", None), "backend", None) if model.predictor else None
    return backend if getattr(backend, "session", None) is not None else None


def cpu_session(onnx_file: Path, threads: int | None):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads that sleep when idle."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = int(threads or cpu_threads())
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])


def session_threads(model) -> int | None:
    """The intra-op threads of a CPU ONNX Runtime session made by :func:`load_detector` (None otherwise)."""
    backend = _onnx_backend(model)
    if backend is None or backend.session.get_providers() != ["CPUExecutionProvider"]:
        return None
    return int(backend.session.get_session_options().intra_op_num_threads)


def providers(model) -> list[str]:
    """The execution providers of a model loaded by :func:`load_detector` (``["torch"]`` for PyTorch)."""
    backend = _onnx_backend(model)
    return list(backend.session.get_providers()) if backend is not None else ["torch"]
