"""``detloop serve``: the ``production`` model over HTTP, every request in the prediction log.

Endpoints (loopback ``127.0.0.1:8080`` by default, ``conf/serve``):

* ``POST /invocations``: the MLflow pyfunc scoring protocol, as ``mlflow models serve`` accepts it
  (``Content-Type: application/json`` with ``dataframe_split``, ``dataframe_records``, ``inputs`` or
  ``instances``; the column ``image`` holds base64 image bytes), or one raw image body
  (``Content-Type: image/jpeg``, ``image/png`` ...). The answer is MLflow's ``{"predictions": [...]}``
  (one record per detection: row, class_id, class_name, confidence, x1, y1, x2, y2, xc, yc, w, h)
  plus ``model_version``, ``request_id`` and one ``images`` entry per input row; the
  ``X-Model-Version`` header names the version too. The model's own ``predict`` answers.
* ``POST /report``: a user marks a failed image (JSON ``{"image": base64, "note": "..."}`` or a raw
  image body with ``?note=``): the image and the production model's prediction, as proposed YOLO
  labels, go to the inbox through :func:`detloop.data.inbox.add_to_inbox` (201; 409 for a duplicate,
  422 for another refusal, each with the reason).
* ``GET /health`` (and ``/ping``): ``ok`` with the served version; ``GET /version``: versions.

Promotion and rollback without a restart: a background thread checks which version holds
``serve.alias`` every ``serve.poll_seconds``; a new holder is loaded and warmed up beside the
serving one, then swapped in with one reference assignment. A request uses one version from start
to end, and its answer and log rows name it.

Bad input (empty body, malformed JSON, no ``image`` column, not base64, not an image, a truncated
or oversized image, too many images) gets a 4xx whose message names the row and what is wrong; it
is logged like every other request (status and error), and the server keeps serving. Each request
is written to the prediction log (:mod:`detloop.production.predlog`) before its answer is sent.

Served images are kept (``serve.images``), content-addressed, so ``detloop abset build`` can draw
the Gate 3 A/B sample from real production traffic.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from omegaconf import DictConfig

from detloop.core.env import in_project
from detloop.core.errors import BadInput
from detloop.data.manifest import sha256_bytes
from detloop.production import predlog

log = logging.getLogger(__name__)

JSON_FORMATS = ("dataframe_split", "dataframe_records", "inputs", "instances")
RAW_TYPES = ("image/", "application/octet-stream")
SUFFIXES = {"jpeg": ".jpg", "mpo": ".jpg", "tiff": ".tif", "jpeg2000": ".jp2"}
ERROR_CHARS = 2000  # longest error text kept in the log


class RequestRefused(BadInput):
    """A request the server does not score: ``status`` is the HTTP code (4xx), the message says why."""

    def __init__(self, status: int, summary: str, problems: list[str] | None = None):
        self.status = status
        super().__init__(summary, problems)


# --------------------------------------------------------------------------- input checks


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
    return CheckedImage(raw, sha256_bytes(raw), fmt, width, height)


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
    return frame_images(parse_frame(decode_json(body)), limits)


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
    values = frame["image"].tolist()
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


# --------------------------------------------------------------------------- the served model


@dataclass(frozen=True)
class ServedModel:
    """One loaded registry version."""

    name: str
    version: str
    model: object  # mlflow.pyfunc.PyFuncModel
    loaded_at: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def load_version(name: str, version: str) -> ServedModel:
    """Load ``models:/name/version`` and warm it up with the model's input example."""
    import mlflow.pyfunc

    from detloop.model.pyfunc import input_example

    started = time.perf_counter()
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    model.predict(input_example())  # the first prediction pays for lazy set-up; not a user's request
    log.info("loaded %s version %s in %.1f s", name, version, time.perf_counter() - started)
    return ServedModel(name, str(version), model, datetime.now(UTC).isoformat(timespec="seconds"))


@dataclass
class WatchState:
    """What the alias watcher last saw (shown by /health)."""

    checked_at: str | None = None
    error: str | None = None
    failed_version: str | None = None  # a holder that failed to load; retried when the alias moves again
    swaps: list[dict] = field(default_factory=list)


class ModelWatcher:
    """Serves the holder of ``alias``: polls it and swaps a newly promoted (or rolled back) version in."""

    def __init__(
        self, name: str, alias: str, poll_seconds: float, loader: Callable[[str, str], ServedModel] = load_version
    ):
        self.name, self.alias, self.poll_seconds = name, alias, float(poll_seconds)
        self.loader = loader
        self.state = WatchState()
        self._current: ServedModel | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def current(self) -> ServedModel:
        """The version serving now (read once per request)."""
        if self._current is None:
            raise RuntimeError("no model loaded: call ModelWatcher.load() first")
        return self._current

    def holder(self) -> str | None:
        from detloop.tracking.registry import alias_holder

        return alias_holder(self.name, self.alias)

    def load(self) -> ServedModel:
        """Load the alias holder at start; BadInput (exit 2) when no version holds the alias."""
        version = self.holder()
        if version is None:
            raise BadInput(
                f"nothing to serve: no version of {self.name} holds '{self.alias}'",
                [
                    "promote one first: detloop promote VERSION --reviewer NAME --reason TEXT",
                    "or serve another alias: serve.alias=staging",
                ],
            )
        self._current = self.loader(self.name, version)
        self.state.checked_at = _now()
        return self._current

    def check(self) -> bool:
        """Look up the alias once; load and swap in a new holder. True when the served version changed."""
        try:
            version = self.holder()
        except Exception as err:  # registry unreachable: keep serving what is loaded
            self.state.error = f"alias lookup failed: {err}"
            log.warning("%s; still serving v%s", self.state.error, self.current.version)
            return False
        self.state.checked_at = _now()
        if version is None:
            self.state.error = f"no version holds '{self.alias}'; still serving v{self.current.version}"
            log.warning("%s", self.state.error)
            return False
        if version == self.state.failed_version:  # its load error stays shown until the alias moves again
            return False
        if version == self.current.version:
            self.state.error, self.state.failed_version = None, None
            return False
        try:
            loaded = self.loader(self.name, version)
        except Exception as err:  # a broken version must not take the server down
            self.state.error = (
                f"loading v{version} failed ({type(err).__name__}: {err}); still serving v{self.current.version}"
            )
            self.state.failed_version = version
            log.error("%s", self.state.error)
            return False
        previous = self.current.version
        self._current = loaded  # the swap: one reference assignment; requests in flight keep their model
        self.state.error, self.state.failed_version = None, None
        self.state.swaps.append({"from": previous, "to": version, "at": loaded.loaded_at})
        log.info("'%s' moved: now serving %s version %s (was %s)", self.alias, self.name, version, previous)
        return True

    def start(self) -> None:
        """Poll the alias every ``poll_seconds`` in a daemon thread."""
        if self.poll_seconds <= 0:
            log.info(
                "serve.poll_seconds=%s: the alias is not polled; restart to serve a new version", self.poll_seconds
            )
            return
        self._thread = threading.Thread(target=self._poll, name="alias-watcher", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self.check()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- the service


@dataclass
class _Job:
    served: ServedModel
    images: list[CheckedImage]
    done: threading.Event = field(default_factory=threading.Event)
    result: list[list[dict]] | None = None
    error: BaseException | None = None

    @property
    def shape(self) -> tuple[int, int] | None:
        """The images' common size, or None when they differ (such a job is never merged with others)."""
        sizes = {(im.width, im.height) for im in self.images}
        return sizes.pop() if len(sizes) == 1 else None


class Batcher:
    """One model call at a time (the model is not thread-safe), with opportunistic batching.

    Requests that arrive while the model is busy queue up; the next call takes the queued jobs of the
    same model version and the same image size together, up to ``max_images`` images (one pyfunc
    ``predict`` on the combined table). Nothing waits for a batch to fill, so a lone request is never
    delayed. Equal sizes keep each image's preprocessing (Ultralytics' letterbox) exactly as in a
    single call. A failing batch is retried job by job, so one request's failure stays its own.
    """

    def __init__(self, max_images: int):
        if max_images < 1:
            raise BadInput(f"serve.batch_images={max_images}: must be >= 1 (1 = no batching)")
        self.max_images = max_images
        self._queue: list[_Job] = []
        self._cond = threading.Condition()
        self._busy = False
        self.calls = 0  # model calls so far (batching shows as calls < requests)

    def predict(self, served: ServedModel, images: list[CheckedImage]) -> list[list[dict]]:
        job = _Job(served, images)
        with self._cond:
            self._queue.append(job)
        while not job.done.is_set():
            batch = self._take()
            if batch is None:  # another thread is running the model: wait for it, then look again
                with self._cond:
                    self._cond.wait_for(lambda: job.done.is_set() or not self._busy, timeout=1.0)
                continue
            try:
                self._run(batch)
            finally:
                for other in batch:  # never leave a request waiting for a call that did not finish
                    if not other.done.is_set():
                        other.error = other.error or RuntimeError("the prediction was interrupted")
                        other.done.set()
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
        if job.error is not None:
            raise job.error
        return job.result

    def _take(self) -> list[_Job] | None:
        """The next batch (marking the model busy), or None while the model is busy."""
        with self._cond:
            if self._busy or not self._queue:
                return None
            first = self._queue.pop(0)
            batch, count = [first], len(first.images)
            for job in list(self._queue):
                fits = count + len(job.images) <= self.max_images
                if fits and job.served is first.served and first.shape is not None and job.shape == first.shape:
                    self._queue.remove(job)
                    batch.append(job)
                    count += len(job.images)
            self._busy = True
            return batch

    def _run(self, batch: list[_Job]) -> None:
        try:
            results = self._call(batch[0].served, [im for job in batch for im in job.images])
        except Exception as err:
            if len(batch) == 1:
                batch[0].error = err
                batch[0].done.set()
                return
            for job in batch:  # isolate the failing request
                self._run([job])
            return
        offset = 0
        for job in batch:
            job.result = results[offset : offset + len(job.images)]
            for row, detections in enumerate(job.result):  # rows count within each request again
                for detection in detections:
                    detection["row"] = row
            offset += len(job.images)
            job.done.set()

    def _call(self, served: ServedModel, images: list[CheckedImage]) -> list[list[dict]]:
        import pandas as pd

        self.calls += 1
        table = served.model.predict(pd.DataFrame({"image": [im.base64() for im in images]}))
        return predictions_by_row(table, len(images))


@dataclass
class Answer:
    """An HTTP answer: status and JSON payload."""

    status: int
    payload: dict


def predictions_by_row(table, count: int) -> list[list[dict]]:
    """The pyfunc output table split per input row (records, as the scoring protocol returns them)."""
    records = table.to_dict(orient="records") if len(table) else []
    out: list[list[dict]] = [[] for _ in range(count)]
    for record in records:
        record = {k: (v.item() if hasattr(v, "item") else v) for k, v in record.items()}
        out[int(record["row"])].append(record)
    return out


def yolo_lines(detections: list[dict]) -> list[str]:
    """Detections as YOLO label lines (``class xc yc w h``, normalized), degenerate boxes dropped."""
    lines = []
    for d in detections:
        xc, yc, w, h = (min(max(float(d[k]), 0.0), 1.0) for k in ("xc", "yc", "w", "h"))
        if w > 0 and h > 0:
            lines.append(f"{int(d['class_id'])} {xc:.6f} {yc:.6f} {w:.6f} {h:.6f}")
    return lines


def store_image(folder: Path, image: CheckedImage) -> Path:
    """Keep ``image`` once under ``folder/<sha[:2]>/<sha><suffix>`` (temp name + rename); return its path."""
    path = folder / image.sha256[:2] / f"{image.sha256}{image.suffix}"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
        tmp.write_bytes(image.raw)
        tmp.replace(path)
    return path


class Service:
    """The server's work, independent of the web framework: score, report, health."""

    def __init__(self, cfg: DictConfig, watcher: ModelWatcher, log_store: predlog.PredictionLog):
        from detloop.core.config import resolve_path

        self.cfg = cfg
        self.watcher = watcher
        self.predlog = log_store
        self.limits = Limits.from_cfg(cfg)
        self.image_dir = in_project(cfg.serve.images.dir) if cfg.serve.images.store else None
        self.report_dir = in_project(cfg.serve.report.dir)
        self.inbox = resolve_path(cfg, "inbox")
        self.batcher = Batcher(int(cfg.serve.batch_images))
        self.started_at = _now()

    # ------------------------------------------------------------------ scoring

    def predict(self, served: ServedModel, images: list[CheckedImage]) -> list[list[dict]]:
        """The served model's detections for each image (its pyfunc ``predict``, batched with other requests)."""
        return self.batcher.predict(served, images)

    def invocations(self, body: bytes, content_type: str | None, arrived: float | None = None) -> Answer:
        """Score a request; every outcome is logged before the answer is returned."""
        arrived = time.time() if arrived is None else arrived
        started = time.perf_counter()
        request_id = predlog.new_request_id()
        served = self.watcher.current
        try:
            images = parse_request(body, content_type, self.limits)
            per_row = self.predict(served, images)
            paths = [str(store_image(self.image_dir, im)) if self.image_dir else None for im in images]
        except RequestRefused as err:
            return self._refused(err, body, served, request_id, arrived, started, "invocations")
        except Exception as err:
            log.exception("request %s failed", request_id)
            return self._refused(
                RequestRefused(500, f"prediction failed: {type(err).__name__}: {err}"),
                body,
                served,
                request_id,
                arrived,
                started,
                "invocations",
            )
        elapsed = (time.perf_counter() - started) * 1000.0
        records = [
            predlog.Record(
                ts=arrived,
                request_id=request_id,
                endpoint="invocations",
                status=200,
                model_version=served.version,
                latency_ms=elapsed / len(images),
                request_ms=elapsed,
                batch_size=len(images),
                image_sha256=im.sha256,
                image_path=path,
                width=im.width,
                height=im.height,
                **predlog.detection_fields(dets),
            )
            for im, path, dets in zip(images, paths, per_row, strict=True)
        ]
        if (failed := self._write(records)) is not None:
            return failed
        payload = {
            "predictions": [d for dets in per_row for d in dets],
            "model_version": served.version,
            "model_uri": served.uri,
            "request_id": request_id,
            "images": [
                {"row": i, "sha256": im.sha256, "width": im.width, "height": im.height, "detections": len(dets)}
                for i, (im, dets) in enumerate(zip(images, per_row, strict=True))
            ],
        }
        return Answer(200, payload)

    def _refused(
        self,
        err: RequestRefused,
        body: bytes,
        served: ServedModel,
        request_id: str,
        arrived: float,
        started: float,
        endpoint: str,
    ) -> Answer:
        elapsed = (time.perf_counter() - started) * 1000.0
        message = err.render()
        record = predlog.Record(
            ts=arrived,
            request_id=request_id,
            endpoint=endpoint,
            status=err.status,
            model_version=served.version,
            error=message[:ERROR_CHARS],
            latency_ms=elapsed,
            request_ms=elapsed,
            image_sha256=sha256_bytes(body) if body else None,
        )
        if (failed := self._write([record])) is not None:
            return failed
        log.info("request %s refused (%d): %s", request_id, err.status, err.summary)
        return Answer(
            err.status,
            {
                "error": err.summary,
                "problems": err.problems,
                "status": err.status,
                "request_id": request_id,
                "model_version": served.version,
            },
        )

    def _write(self, records: list[predlog.Record]) -> Answer | None:
        """Write the log rows; a 503 answer when the log cannot take them (nothing is answered unlogged)."""
        try:
            self.predlog.write(records)
        except Exception as err:  # the database is down or full: say so instead of answering unlogged
            log.error("prediction log %s: write failed: %s", predlog.shown_uri(self.predlog.uri), err)
            return Answer(
                503,
                {
                    "error": f"the prediction log cannot be written ({type(err).__name__}); the request was not scored",
                    "status": 503,
                },
            )
        return None

    # ------------------------------------------------------------------ reports

    def report(self, body: bytes, content_type: str | None, note: str | None = None) -> Answer:
        """A failure report: the image and the production prediction go to the inbox."""
        arrived, started = time.time(), time.perf_counter()
        request_id = predlog.new_request_id()
        served = self.watcher.current
        try:
            image, note = parse_report(body, content_type, note, self.limits)
            detections = self.predict(served, [image])[0]
            result = self._to_inbox(image, detections, note)
        except RequestRefused as err:
            return self._refused(err, body, served, request_id, arrived, started, "report")
        except BadInput as err:  # the inbox itself is unusable (no anchor manifest ...): not the client's fault
            return self._refused(
                RequestRefused(503, f"the inbox cannot take reports: {err.summary}", err.problems),
                body,
                served,
                request_id,
                arrived,
                started,
                "report",
            )
        elapsed = (time.perf_counter() - started) * 1000.0
        record = predlog.Record(
            ts=arrived,
            request_id=request_id,
            endpoint="report",
            status=201,
            model_version=served.version,
            latency_ms=elapsed,
            request_ms=elapsed,
            batch_size=1,
            image_sha256=image.sha256,
            image_path=result["path"],
            width=image.width,
            height=image.height,
            **predlog.detection_fields(detections),
        )
        if (failed := self._write([record])) is not None:
            return failed
        return Answer(
            201,
            {
                "id": result["id"],
                "inbox": str(self.inbox),
                "inbox_size": result["inbox_size"],
                "proposed_labels": result["labels"],
                "model_version": served.version,
                "request_id": request_id,
                "predictions": detections,
            },
        )

    def _to_inbox(self, image: CheckedImage, detections: list[dict], note: str | None) -> dict:
        """Keep the reported image, write the proposed labels beside a temp copy, add it to the inbox."""
        path = store_image(self.report_dir, image)
        return add_report(self.cfg, path, detections, note)

    # ------------------------------------------------------------------ status

    def health(self) -> dict:
        served, state = self.watcher.current, self.watcher.state
        return {
            "status": "ok",
            "model": served.name,
            "alias": self.watcher.alias,
            "version": served.version,
            "model_uri": served.uri,
            "loaded_at": served.loaded_at,
            "started_at": self.started_at,
            "alias_checked_at": state.checked_at,
            "poll_seconds": self.watcher.poll_seconds,
            "alias_error": state.error,
            "swaps": state.swaps[-10:],
            "model_calls": self.batcher.calls,
            "predlog": predlog.shown_uri(self.predlog.uri),
        }

    def versions(self) -> dict:
        from importlib.metadata import version

        return {
            "model": self.watcher.name,
            "model_version": self.watcher.current.version,
            "detloop": version("detloop"),
            "mlflow": version("mlflow"),
        }


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


def add_report(cfg: DictConfig, image: Path, detections: list[dict], note: str | None) -> dict:
    """``image`` with the detections as proposed labels into the inbox (``add_to_inbox``).

    Returns ``{id, path, labels, inbox_size}``; a refusal (duplicate report, test leakage, bad image)
    raises RequestRefused: 409 for a duplicate, 422 otherwise, with the inbox's reason. A prediction
    without detections proposes no labels (the reviewer must label the sample to accept it).
    """
    from detloop.data.inbox import add_to_inbox

    lines = yolo_lines(detections)
    with tempfile.TemporaryDirectory(prefix="detloop-report-") as tmp:
        if lines:
            (Path(tmp) / f"{image.stem}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        result = add_to_inbox(image, cfg, labels=Path(tmp), note=note)
    if result["refused"]:
        reason = "; ".join(item["reason"] for item in result["refused"])
        status = 409 if "duplicate" in reason else 422
        raise RequestRefused(status, f"report refused: {reason}")
    return {
        "id": result["accepted"][0],
        "path": str(image),
        "labels": len(lines),
        "inbox_size": result["counts"]["inbox_size"],
    }


# --------------------------------------------------------------------------- HTTP


def create_app(service: Service):
    """The ASGI application (Starlette) around ``service``; prediction work runs in the thread pool."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    def reply(answer: Answer) -> JSONResponse:
        version = answer.payload.get("model_version") or service.watcher.current.version
        return JSONResponse(answer.payload, status_code=answer.status, headers={"X-Model-Version": str(version)})

    async def health(request) -> JSONResponse:
        return JSONResponse(service.health())

    async def version(request) -> JSONResponse:
        return JSONResponse(service.versions())

    async def invocations(request) -> JSONResponse:
        arrived = time.time()
        body, too_large = await read_body(request, service.limits.max_body_bytes)
        if too_large is not None:
            return reply(await run_in_threadpool(_refuse_body, service, too_large, "invocations"))
        content_type = request.headers.get("content-type")
        return reply(await run_in_threadpool(service.invocations, body, content_type, arrived))

    async def report(request) -> JSONResponse:
        body, too_large = await read_body(request, service.limits.max_body_bytes)
        if too_large is not None:
            return reply(await run_in_threadpool(_refuse_body, service, too_large, "report"))
        content_type, note = request.headers.get("content-type"), request.query_params.get("note")
        return reply(await run_in_threadpool(service.report, body, content_type, note))

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/ping", health, methods=["GET"]),
            Route("/version", version, methods=["GET"]),
            Route("/invocations", invocations, methods=["POST"]),
            Route("/report", report, methods=["POST"]),
        ]
    )


async def read_body(request, limit: int) -> tuple[bytes, str | None]:
    """The body, read up to ``limit`` bytes; (b"", message) when it is larger.

    The rest of an oversized body is read and dropped, so the client gets the 413 instead of a reset
    connection.
    """
    declared = request.headers.get("content-length")
    chunks, size = [], 0
    too_large = None
    if declared and declared.isdigit() and int(declared) > limit:
        too_large = f"request body of {declared} bytes is larger than serve.limits.max_body_bytes={limit}"
    async for chunk in request.stream():
        size += len(chunk)
        if too_large is None and size > limit:
            too_large = f"request body larger than serve.limits.max_body_bytes={limit} bytes"
        if too_large is None:
            chunks.append(chunk)
    return (b"", too_large) if too_large else (b"".join(chunks), None)


def _refuse_body(service: Service, message: str, endpoint: str) -> Answer:
    started, arrived = time.perf_counter(), time.time()
    return service._refused(
        RequestRefused(413, message), b"", service.watcher.current, predlog.new_request_id(), arrived, started, endpoint
    )


def build_service(cfg: DictConfig) -> Service:
    """Set up MLflow, load the alias holder, open the prediction log (BadInput when nothing is served)."""
    from detloop.tracking import runs

    runs.setup(cfg)
    watcher = ModelWatcher(cfg.mlflow.registered_model, str(cfg.serve.alias), float(cfg.serve.poll_seconds))
    watcher.load()
    return Service(cfg, watcher, predlog.open_log(cfg))


def serve(cfg: DictConfig, host: str | None = None, port: int | None = None) -> int:
    """Run the server until interrupted (``detloop serve``); returns the exit code."""
    import uvicorn

    service = build_service(cfg)
    host = host or str(cfg.serve.host)
    port = int(port if port is not None else cfg.serve.port)
    service.watcher.start()
    log.info(
        "serving %s v%s ('%s') on http://%s:%d; prediction log %s",
        service.watcher.name,
        service.watcher.current.version,
        service.watcher.alias,
        host,
        port,
        predlog.shown_uri(service.predlog.uri),
    )
    try:
        uvicorn.run(
            create_app(service),
            host=host,
            port=port,
            workers=1,
            access_log=False,
            log_level="warning",
            timeout_graceful_shutdown=10,
        )
    finally:
        service.watcher.stop()
        service.predlog.close()
    return 0


# --------------------------------------------------------------------------- detloop report IMAGE


def report_image(cfg: DictConfig, image: Path, note: str | None = None) -> dict:
    """``detloop report IMAGE``: predict with the ``serve.alias`` holder, add image + proposal to the inbox.

    Raises BadInput (exit 2, nothing written) for a missing or unreadable image, when no version holds
    the alias, and when the inbox refuses the report (the reason is in the message).
    """
    from detloop.data.yolo_format import check_image
    from detloop.tracking import runs

    image = Path(image).expanduser().absolute()
    if not image.is_file():
        raise BadInput(f"{image}: no such image file; nothing was written")
    problems = check_image(image, int(cfg.inbox.max_pixels))
    if problems:
        raise BadInput(f"{image}: not a usable image; nothing was written", problems)
    runs.setup(cfg)
    watcher = ModelWatcher(cfg.mlflow.registered_model, str(cfg.serve.alias), 0, loader=_load_cold)
    served = watcher.load()
    import pandas as pd

    table = served.model.predict(pd.DataFrame({"image": [str(image)]}))
    detections = predictions_by_row(table, 1)[0]
    try:
        added = add_report(cfg, image, detections, note)
    except RequestRefused as err:
        raise BadInput(f"{image}: {err.summary}; nothing was written") from err
    return {**added, "model_version": served.version, "detections": len(detections)}


def _load_cold(name: str, version: str) -> ServedModel:
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    return ServedModel(name, str(version), model, _now())
