"""The MLflow model contract: a pyfunc that turns images into one row per detection.

Input: a table with a column ``image`` holding base64-encoded image bytes or a local file path.
Output: one row per detection with the input row index, class id and name, confidence, the box in
pixel xyxy and in normalized xywh. ``mlflow models serve`` and ``detloop serve`` share it.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
from pathlib import Path

import mlflow.pyfunc

log = logging.getLogger(__name__)

OUTPUT_COLUMNS = [
    "row",
    "class_id",
    "class_name",
    "confidence",
    "x1",
    "y1",
    "x2",
    "y2",
    "xc",
    "yc",
    "w",
    "h",
]
WEIGHTS_ARTIFACT = "weights"


def decode_image(value, row: int):
    """A PIL image from base64 bytes/str or a local path; errors name the row."""
    from PIL import Image

    if isinstance(value, bytes | bytearray):
        raw = bytes(value)
    elif isinstance(value, str) and _is_file(value):
        return Image.open(value).convert("RGB")
    elif isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as err:
            raise ValueError(f"row {row}: 'image' is neither an existing file path nor base64") from err
    else:
        raise ValueError(f"row {row}: 'image' must be a base64 string or a path, got {type(value).__name__}")
    try:
        return Image.open(io.BytesIO(raw)).convert("RGB")
    except Exception as err:  # PIL raises several types for undecodable bytes
        raise ValueError(f"row {row}: 'image' bytes are not a decodable image ({err})") from err


def _is_file(value: str) -> bool:
    try:
        return len(value) < 4096 and Path(value).is_file()
    except OSError:  # e.g. a base64 string longer than a file name may be
        return False


def detection_rows(results, names: dict[int, str]) -> list[list]:
    """Ultralytics results (one per input row) as output rows (``OUTPUT_COLUMNS`` order, Python scalars)."""
    rows = []
    for index, result in enumerate(results):
        boxes = result.boxes
        if boxes is None or len(boxes) == 0:
            continue
        xyxy = boxes.xyxy.cpu().numpy()
        xywhn = boxes.xywhn.cpu().numpy()
        for cls, conf, b, n in zip(boxes.cls.tolist(), boxes.conf.tolist(), xyxy, xywhn, strict=True):
            cid = int(cls)
            rows.append([index, cid, names.get(cid, str(cid)), float(conf), *map(float, b), *map(float, n)])
    return rows


class DetectorModel(mlflow.pyfunc.PythonModel):
    """YOLO weights behind the pyfunc interface."""

    def load_context(self, context):
        from detloop.model import runtime

        config = dict(context.model_config or {})
        self.conf = float(config.get("conf", 0.25))
        self.iou = float(config.get("iou", 0.7))
        self.imgsz = int(config.get("imgsz", 640))
        self.device = config.get("device") or None
        exported = context.artifacts.get(runtime.ONNX_ARTIFACT)
        self.runtime = runtime.choose(str(config.get("runtime") or "auto"), Path(exported) if exported else None)
        weights = exported if self.runtime == "onnx" else context.artifacts[WEIGHTS_ARTIFACT]
        threads = config.get("threads")  # None: every CPU of the process (runtime.load_detector)
        self.model = runtime.load_detector(
            weights, imgsz=self.imgsz, device=self.device, threads=int(threads) if threads else None
        )
        self.providers = runtime.providers(self.model)
        self.threads = runtime.session_threads(self.model)
        self.names = {int(k): v for k, v in self.model.names.items()}
        log.info("detector loaded on %s (%s)", self.runtime, ", ".join(self.providers))

    def predict(self, context, model_input, params=None):
        """Detections for every row of ``model_input`` (confidence >= the model's ``conf``)."""
        import pandas as pd

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "image" not in frame.columns:
            raise ValueError(f"input needs a column 'image'; got columns {list(frame.columns)}")
        images = [decode_image(v, i) for i, v in enumerate(frame["image"].tolist())]
        if not images:
            return pd.DataFrame(columns=OUTPUT_COLUMNS)
        return pd.DataFrame(self.detect(images), columns=OUTPUT_COLUMNS)

    @staticmethod
    def prepare(image):
        """A decoded RGB PIL image as the array Ultralytics makes of it before predicting: EXIF orientation
        applied, BGR channel order (OpenCV's), contiguous. :meth:`detect` gives the same rows for either;
        ``detloop serve`` prepares each request's images in the request's own thread, while the model is
        busy with other requests."""
        import cv2
        import numpy as np
        from PIL import ImageOps

        return cv2.cvtColor(np.asarray(ImageOps.exif_transpose(image)), cv2.COLOR_RGB2BGR)

    def detect(self, images: list) -> list[list]:
        """Output rows (``OUTPUT_COLUMNS`` order) for already decoded images, without the table: what
        ``predict`` does after decoding. Each image is an RGB PIL image or what :meth:`prepare` made of one.
        ``detloop serve`` calls it with the images it decoded to check them, so each request image is
        decoded once."""
        results = self.model.predict(
            images,
            conf=self.conf,
            iou=self.iou,
            imgsz=self.imgsz,
            device=self.device,
            verbose=False,
        )
        return detection_rows(results, self.names)


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = Schema([ColSpec("string", "image")])
    kinds = ["long", "long", "string"] + ["double"] * 9
    outputs = Schema([ColSpec(k, c) for k, c in zip(kinds, OUTPUT_COLUMNS, strict=True)])
    return ModelSignature(inputs=inputs, outputs=outputs)


def log_detector(
    weights: str | Path, model_config: dict, registered_model_name: str | None = None, *, onnx: bool = True
):
    """Log ``weights`` as an MLflow pyfunc model in the active run; register it if a name is given.

    With ``onnx`` the weights are also exported to ONNX at the model's ``imgsz`` and logged beside them
    (artifact ``onnx``): what ``serve`` runs (``runtime`` in ``model_config``, see
    :mod:`detloop.model.runtime`). Returns the ModelInfo (``registered_model_version`` is set when
    registered).
    """
    import tempfile

    from detloop.model import runtime

    package = Path(__file__).resolve().parents[1]  # the whole detloop package travels with the model
    # every key load_context reads is recorded (None: its default), since MLflow applies a loader's
    # model_config only to keys the logged config holds (serve.runtime / serve.threads are such overrides)
    config = {"runtime": "auto", "threads": None, **model_config}
    with tempfile.TemporaryDirectory(prefix="detloop-model-") as tmp:
        artifacts = {WEIGHTS_ARTIFACT: str(weights)}
        if onnx:
            exported = runtime.export_onnx(weights, int(config.get("imgsz", 640)), Path(tmp))
            artifacts[runtime.ONNX_ARTIFACT] = str(exported)
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(package / "serving_model.py"),
            input_example=input_example(),
            artifacts=artifacts,
            code_paths=[str(package)],
            signature=signature(),
            model_config=config,
            registered_model_name=registered_model_name,
            pip_requirements=_pip_requirements(onnx),
        )


def input_example():
    """A one-row request (a blank 64x64 PNG, base64) documenting the input format."""
    import pandas as pd
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(buffer, format="PNG")
    return pd.DataFrame({"image": [base64.b64encode(buffer.getvalue()).decode("ascii")]})


def _pip_requirements(onnx: bool = False) -> list[str]:
    from importlib.metadata import version

    pkgs = ["mlflow", "ultralytics", "torch", "torchvision", "pillow", "pandas", "omegaconf", "hydra-core"]
    if onnx:
        pkgs += ["onnx", "onnxruntime"]
    return [f"{p}=={version(p)}" for p in pkgs]


def model_weights(model_uri: str, dst: Path) -> tuple[Path, dict]:
    """Download a registered detector; return its weights file and its model config."""
    from mlflow.models import Model

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    weights = sorted((local / "artifacts").glob("*.pt"))
    if not weights:
        raise FileNotFoundError(f"{model_uri}: no .pt weights in the model's artifacts")
    config = Model.load(str(local)).flavors.get("python_function", {}).get("config", {}) or {}
    return weights[0], dict(config)


def exported_onnx(weights: Path) -> Path | None:
    """The ONNX export logged with the version whose weights :func:`model_weights` gave, if any."""
    onnx = weights.with_suffix(".onnx")
    return onnx if onnx.is_file() else None
