"""The service behind the web app: scoring and failure reports through the watched model and the batcher,
every request written to the prediction log before its answer; health and versions."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from detloop.core.env import in_project
from detloop.core.errors import BadInput
from detloop.data.manifest import sha256_bytes
from detloop.production import predlog
from detloop.production.batching import Batcher
from detloop.production.reports import add_report
from detloop.production.request_checks import CheckedImage, Limits, RequestRefused, parse_report, parse_request
from detloop.production.swap import ModelWatcher, ServedModel, load_version, now_iso

log = logging.getLogger(__name__)

ERROR_CHARS = 2000  # longest error text kept in the log


@dataclass
class Answer:
    """An HTTP answer: status and JSON payload."""

    status: int
    payload: dict


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
        self.workers = serve_workers(cfg)
        self.started_at = now_iso()

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
            **served.runtime,
            "started_at": self.started_at,
            "alias_checked_at": state.checked_at,
            "poll_seconds": self.watcher.poll_seconds,
            "alias_error": state.error,
            "swaps": state.swaps[-10:],
            "model_calls": self.batcher.calls,
            "predlog": predlog.shown_uri(self.predlog.uri),
            "worker": os.getpid(),  # the server process that answered (one of serve.workers)
            "workers": self.workers,
        }

    def versions(self) -> dict:
        from importlib.metadata import version

        return {
            "model": self.watcher.name,
            "model_version": self.watcher.current.version,
            "detloop": version("detloop"),
            "mlflow": version("mlflow"),
        }


def refuse_body(service: Service, message: str, endpoint: str) -> Answer:
    started, arrived = time.perf_counter(), time.time()
    return service._refused(
        RequestRefused(413, message), b"", service.watcher.current, predlog.new_request_id(), arrived, started, endpoint
    )


def runtime_overrides(cfg: DictConfig) -> dict:
    """``serve.runtime`` / ``serve.threads`` when set: they override what each version recorded."""
    from detloop.model.runtime import RUNTIMES

    keys = {"runtime": cfg.serve.get("runtime"), "threads": cfg.serve.get("threads")}
    if keys["runtime"] is not None and keys["runtime"] not in RUNTIMES:
        raise BadInput(f"serve.runtime: must be one of {', '.join(RUNTIMES)} or null, got {keys['runtime']!r}")
    threads = keys["threads"]
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise BadInput(f"serve.threads: must be a whole number >= 1 or null, got {threads!r}")
    return {key: value for key, value in keys.items() if value is not None}


def serve_workers(cfg: DictConfig) -> int:
    """``serve.workers``, checked: the server processes sharing the port."""
    workers = cfg.serve.get("workers", 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise BadInput(f"serve.workers: must be a whole number >= 1, got {workers!r}")
    return workers


def make_watcher(cfg: DictConfig) -> ModelWatcher:
    """The watcher of ``serve.alias`` (MLflow set up first); nothing is loaded yet."""
    from detloop.tracking import oversight, runs

    runs.setup(cfg)
    alias = str(cfg.serve.alias)
    return ModelWatcher(
        cfg.mlflow.registered_model,
        alias,
        float(cfg.serve.poll_seconds),
        loader=lambda name, version: load_version(name, version, runtime_overrides(cfg)),
        oversee=lambda: oversight.watch(cfg, (alias,), seen_by="serve"),
        may_serve=lambda version: oversight.may_serve(cfg, alias, version),
    )


def check_servable(cfg: DictConfig) -> str:
    """What every server process would check at start, without loading the model: the serve settings (as
    ``serve.workers`` already was), a version holding the alias, and the prediction log (its table created
    here, once). Returns the version."""
    runtime_overrides(cfg)
    Batcher(int(cfg.serve.batch_images))
    Limits.from_cfg(cfg)
    version = make_watcher(cfg).servable()
    predlog.open_log(cfg).close()
    return version


def build_service(cfg: DictConfig) -> Service:
    """Set up MLflow, load the alias holder, open the prediction log (BadInput when nothing is served)."""
    watcher = make_watcher(cfg)
    watcher.load()
    return Service(cfg, watcher, predlog.open_log(cfg))
