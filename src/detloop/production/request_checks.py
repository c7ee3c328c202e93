"""What the server accepts: scoring and report request bodies parsed and checked, images decoded under
``serve.limits``; a refusal is a RequestRefused with its HTTP status."""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from detloop.core.errors import BadInput
from detloop.data.manifest import sha256_bytes

JSON_FORMATS = ("dataframe_split", "dataframe_records", "inputs", "instances")
RAW_TYPES = ("image/", "application/octet-stream")
SUFFIXES = {"jpeg": ".jpg", "mpo": ".jpg", "tiff": ".tif", "jpeg2000": ".jp2"}


class RequestRefused(BadInput):
    """A request the server does not score: ``status`` is the HTTP code (4xx), the message says why."""

    def __init__(self, status: int, summary: str, problems: list[str] | None = None):
        self.status = status
        super().__init__(summary, problems)


@dataclass(frozen=True)
class Limits:
    """What the server accepts (``serve.limits``)."""

    max_body_bytes: int
    max_image_bytes: int
    max_pixels: int
    max_images: int
    min_side: int
    allow_paths: bool = False

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> Limits:
        lim = cfg.serve.limits
        return cls(
            int(lim.max_body_bytes),
            int(lim.max_image_bytes),
            int(lim.max_pixels),
            int(lim.max_images),
            int(lim.min_side),
            bool(lim.allow_paths),
        )


@dataclass(frozen=True)
class CheckedImage:
    """An image that decodes completely and is within the limits."""

    raw: bytes
    sha256: str
    format: str  # PIL format name, lower case (jpeg, png ...)
    width: int
    height: int
    # the decoded pixels as the model contract decodes them (PIL, RGB): the model gets these, no second decode
    rgb: object = field(default=None, compare=False, repr=False)

    @property
    def suffix(self) -> str:
        return SUFFIXES.get(self.format, f".{self.format}")

    def base64(self) -> str:
        return base64.b64encode(self.raw).decode("ascii")


def _decode_problem(err: Exception) -> str:
    """What is wrong with bytes PIL could not decode, for the client (no object reprs, no plugin internals)."""
    from PIL import UnidentifiedImageError

    if "truncated" in str(err):
        return f"truncated image ({err})"
    if isinstance(err, UnidentifiedImageError | ImportError):  # an optional format plugin may fail to import too
        return "not a decodable image (no supported image format recognised)"
    return f"not a decodable image ({type(err).__name__}: {err})"


def check_image_bytes(raw: bytes, where: str, limits: Limits) -> CheckedImage:
    """Decode ``raw`` completely under the limits; RequestRefused (400/413/415) names ``where`` and the problem."""
    from PIL import Image

    from detloop.data.yolo_format import PIL_FORMATS, strict_pil  # one lock for PIL's global limits

    if not raw:
        raise RequestRefused(400, f"{where}: the image is empty (0 bytes)")
    if len(raw) > limits.max_image_bytes:
        raise RequestRefused(
            413,
            f"{where}: image of {len(raw)} bytes is larger than serve.limits.max_image_bytes={limits.max_image_bytes}",
        )
    try:  # PIL's own pixel limit is off here: the size is checked from the header, before decoding
        with strict_pil(None), Image.open(io.BytesIO(raw)) as im:
            fmt, (width, height) = str(im.format or "").lower(), im.size
            if width * height > limits.max_pixels:
                raise RequestRefused(
                    413,
                    f"{where}: image of {width}x{height} px is larger than serve.limits.max_pixels={limits.max_pixels}",
                )
            im.load()
            rgb = im.convert("RGB")  # as decode_image in the model contract: Image.open(...).convert("RGB")
    except RequestRefused:
        raise
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError ...) for bad bytes
        raise RequestRefused(400, f"{where}: {_decode_problem(err)}") from err
    if fmt not in PIL_FORMATS:
        raise RequestRefused(
            415,
            f"{where}: content is {fmt.upper() or 'unknown'}, not a supported image format",
            [f"supported: {', '.join(sorted(PIL_FORMATS))}"],
        )
    if fmt in ("jpeg", "mpo") and not raw.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise RequestRefused(400, f"{where}: JPEG is truncated (no end-of-image marker)")
    if min(width, height) < limits.min_side:
        raise RequestRefused(
            400, f"{where}: image is {width}x{height} px, smaller than serve.limits.min_side={limits.min_side} px"
        )
    return CheckedImage(raw, sha256_bytes(raw), fmt, width, height, rgb)


def parse_request(body: bytes, content_type: str | None, limits: Limits) -> list[CheckedImage]:
    """The checked images of a scoring request (JSON scoring protocol or one raw image body)."""
    if not body:
        raise RequestRefused(
            400,
            "empty request: the body holds no data",
            [
                "send JSON with one of " + ", ".join(JSON_FORMATS) + " (column 'image': base64 "
                "image bytes), or one image as the body with Content-Type: image/..."
            ],
        )
    mime = (content_type or "").split(";")[0].strip().lower()
    if mime.startswith(RAW_TYPES):
        return [check_image_bytes(body, "body", limits)]
    if mime != "application/json":
        raise RequestRefused(
            415,
            f"unsupported Content-Type {content_type or '(none)'!r}",
            ["use application/json (MLflow scoring protocol) or image/<format> (one raw image)"],
        )
    payload = decode_json(body)
    values = plain_images(payload)
    if values is None:  # any other shape is read by MLflow's own parser, as `mlflow models serve` reads it
        return frame_images(parse_frame(payload), limits)
    return checked_images(values, limits)


def decode_json(body: bytes):
    """The JSON object of a request body; RequestRefused (400) says where the JSON breaks."""
    try:
        payload = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise RequestRefused(400, f"malformed JSON: the body is not UTF-8 text (byte {err.start})") from err
    except json.JSONDecodeError as err:
        raise RequestRefused(400, f"malformed JSON: {err.msg} at line {err.lineno} column {err.colno}") from err
    if not isinstance(payload, dict):
        raise RequestRefused(
            400,
            f"the JSON body must be an object with one of {', '.join(JSON_FORMATS)}; got a {type(payload).__name__}",
        )
    return payload


def plain_images(payload: dict) -> list[str] | None:
    """The ``image`` strings of the two shapes clients send most, read without building a table:
    ``{"dataframe_split": {"columns": ["image"], "data": [[...], ...]}}`` (an ``index`` allowed) and
    ``{"dataframe_records": [{"image": ...}, ...]}``, at least one row, every cell a string. None for anything
    else, which :func:`parse_frame` reads (MLflow's parser gives these two shapes the same ``image`` column)."""
    if len(payload) != 1:
        return None
    if "dataframe_split" in payload:
        split = payload["dataframe_split"]
        if (
            not isinstance(split, dict)
            or split.get("columns") != ["image"]
            or not set(split) <= {"columns", "data", "index"}
        ):
            return None
        rows = split.get("data")
        if (
            not isinstance(rows, list)
            or not rows
            or not all(isinstance(r, list) and len(r) == 1 and isinstance(r[0], str) for r in rows)
        ):
            return None
        if "index" in split and (not isinstance(split["index"], list) or len(split["index"]) != len(rows)):
            return None
        return [r[0] for r in rows]
    if "dataframe_records" in payload:
        records = payload["dataframe_records"]
        if (
            not isinstance(records, list)
            or not records
            or not all(isinstance(r, dict) and len(r) == 1 and isinstance(r.get("image"), str) for r in records)
        ):
            return None
        return [r["image"] for r in records]
    return None


def parse_frame(payload: dict):
    """The request table, parsed as ``mlflow models serve`` parses it (``infer_and_parse_data``)."""
    import pandas as pd
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc.scoring_server import infer_and_parse_data

    from detloop.model.pyfunc import signature

    keys = [k for k in payload if k in JSON_FORMATS]
    if len(keys) != 1:
        raise RequestRefused(
            400, f"the JSON body needs exactly one of {', '.join(JSON_FORMATS)}; got keys {sorted(payload)}"
        )
    try:
        data = infer_and_parse_data({keys[0]: payload[keys[0]]}, signature().inputs)
        return data if isinstance(data, pd.DataFrame) else pd.DataFrame(data)
    except (MlflowException, ValueError, TypeError) as err:
        message = getattr(err, "message", str(err)).split("\n")[0]
        raise RequestRefused(400, f"{keys[0]}: cannot be read as a table ({message})") from err


def frame_images(frame, limits: Limits) -> list[CheckedImage]:
    """Each row's ``image`` (base64, or a local path when ``serve.limits.allow_paths``), checked."""
    if "image" not in frame.columns:
        columns = [str(c) for c in frame.columns]
        raise RequestRefused(400, f"the input table needs a column 'image'; got columns {columns}")
    return checked_images(frame["image"].tolist(), limits)


def checked_images(values: list, limits: Limits) -> list[CheckedImage]:
    """Each ``image`` value of the request (base64, or a local path when ``serve.limits.allow_paths``), checked."""
    if not values:
        raise RequestRefused(400, "no images in the request (the input table has no rows)")
    if len(values) > limits.max_images:
        raise RequestRefused(413, f"{len(values)} images in one request; serve.limits.max_images={limits.max_images}")
    return [check_image_bytes(image_bytes(v, i, limits), f"row {i}", limits) for i, v in enumerate(values)]


def image_bytes(value, row: int, limits: Limits) -> bytes:
    """The bytes of one ``image`` cell (base64 text, or a file path when allowed)."""
    if not isinstance(value, str):
        raise RequestRefused(400, f"row {row}: 'image' must be a base64 string; got {type(value).__name__}")
    if limits.allow_paths and len(value) < 4096 and Path(value).is_file():
        return Path(value).read_bytes()
    if len(value) * 3 // 4 > limits.max_image_bytes + 3:
        raise RequestRefused(
            413,
            f"row {row}: image of about {len(value) * 3 // 4} bytes is larger than "
            f"serve.limits.max_image_bytes={limits.max_image_bytes}",
        )
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as err:
        hint = "" if limits.allow_paths else " (local file paths are refused: serve.limits.allow_paths=false)"
        raise RequestRefused(400, f"row {row}: 'image' is not valid base64 ({err}){hint}") from err


def parse_report(
    body: bytes, content_type: str | None, note: str | None, limits: Limits
) -> tuple[CheckedImage, str | None]:
    """The image (and note) of a report: JSON ``{"image": base64, "note": ...}`` or a raw image body."""
    if not body:
        raise RequestRefused(
            400,
            "empty report: the body holds no data",
            ['send JSON {"image": "<base64>", "note": "..."} or the image as the body with Content-Type: image/...'],
        )
    mime = (content_type or "").split(";")[0].strip().lower()
    if mime.startswith(RAW_TYPES):
        return check_image_bytes(body, "body", limits), note
    if mime != "application/json":
        raise RequestRefused(
            415,
            f"unsupported Content-Type {content_type or '(none)'!r}",
            ['use application/json ({"image": "<base64>", "note": "..."}) or image/<format>'],
        )
    payload = decode_json(body)
    if "image" not in payload:
        raise RequestRefused(400, f"a report needs the key 'image' (base64 image bytes); got keys {sorted(payload)}")
    if payload.get("note") is not None and not isinstance(payload["note"], str):
        raise RequestRefused(400, f"'note' must be a string; got {type(payload['note']).__name__}")
    return check_image_bytes(image_bytes(payload["image"], 0, limits), "image", limits), payload.get("note") or note
