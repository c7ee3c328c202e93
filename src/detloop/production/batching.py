"""The request batcher: one model call at a time, queued requests of one version and image size merged
into one call, and the model's output split back per input row."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from detloop.core.errors import BadInput
from detloop.production.request_checks import CheckedImage
from detloop.production.swap import ServedModel


@dataclass
class _Job:
    served: ServedModel
    images: list[CheckedImage]
    inputs: list | None = None  # what the model's ``detect`` takes (prepared in the request's thread), or None
    done: threading.Event = field(default_factory=threading.Event)
    wake: threading.Event = field(default_factory=threading.Event)  # done, or this job's turn to run the model
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
    same model version and the same image size together, up to ``max_images`` images (one model call on
    the combined images). Nothing waits for a batch to fill, so a lone request is never delayed: its own
    thread runs the model at once. When a call ends, the model is handed to the thread of the oldest
    queued request, and only that thread and those of the finished requests are woken. Equal sizes keep
    each image's preprocessing (Ultralytics' letterbox) exactly as in a single call. A failing batch is
    retried job by job, so one request's failure stays its own.
    """

    def __init__(self, max_images: int):
        if max_images < 1:
            raise BadInput(f"serve.batch_images={max_images}: must be >= 1 (1 = no batching)")
        self.max_images = max_images
        self._queue: list[_Job] = []
        self._lock = threading.Lock()
        self._busy = False  # a thread holds the model (running it, or handed it and about to)
        self.calls = 0  # model calls so far (batching shows as calls < requests)

    def predict(self, served: ServedModel, images: list[CheckedImage]) -> list[list[dict]]:
        job = _Job(served, images, _prepared(served, images))
        with self._lock:
            self._queue.append(job)
            batch = self._take() if not self._busy else None
        while batch is not None or not job.done.is_set():
            if batch is None:
                job.wake.wait()  # set when the job is done, or when the model is handed to this thread
                with self._lock:
                    job.wake.clear()
                    batch = None if job.done.is_set() else self._take()
                continue
            try:
                self._run(batch)
            finally:
                for other in batch:  # never leave a request waiting for a call that did not finish
                    if not other.done.is_set():
                        other.error = other.error or RuntimeError("the prediction was interrupted")
                        other.done.set()
                    other.wake.set()
                with self._lock:
                    self._busy = bool(self._queue)
                    if self._queue:  # hand the model to the oldest waiting request's thread
                        self._queue[0].wake.set()
            batch = None
        if job.error is not None:
            raise job.error
        return job.result

    def _take(self) -> list[_Job]:
        """The next batch, from the head of the queue (called holding the lock; marks the model busy)."""
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
            results = self._call(batch[0].served, batch)
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

    def _call(self, served: ServedModel, batch: list[_Job]) -> list[list[dict]]:
        """One model call. A detloop model takes the pixels the request check decoded (its ``detect``, on
        what its ``prepare`` made of them); any other pyfunc gets the base64 table of the scoring protocol."""
        self.calls += 1
        images = [im for job in batch for im in job.images]
        if all(job.inputs is not None for job in batch):
            detect = _python_model(served.model).detect
            return rows_by_image(detect([x for job in batch for x in job.inputs]), len(images))
        import pandas as pd

        table = served.model.predict(pd.DataFrame({"image": [im.base64() for im in images]}))
        return predictions_by_row(table, len(images))


def _prepared(served: ServedModel, images: list[CheckedImage]) -> list | None:
    """The images as the served detloop model's ``detect`` takes them (prepared here, in the request's
    thread, while the model may be busy); None for another pyfunc or images without decoded pixels."""
    inner = _python_model(served.model)
    if getattr(inner, "detect", None) is None or any(im.rgb is None for im in images):
        return None
    prepare = getattr(inner, "prepare", None)
    return [prepare(im.rgb) if prepare is not None else im.rgb for im in images]


def _python_model(model):
    """The PythonModel behind a loaded pyfunc (None for other flavors)."""
    try:
        return model.unwrap_python_model()
    except (AttributeError, ValueError):  # not a PyFuncModel, or not a PythonModel flavor
        return None


def rows_by_image(rows: list[list], count: int) -> list[list[dict]]:
    """Output rows (``OUTPUT_COLUMNS`` order) as records per input image, as the scoring protocol returns them."""
    from detloop.model.pyfunc import OUTPUT_COLUMNS

    out: list[list[dict]] = [[] for _ in range(count)]
    for row in rows:
        out[int(row[0])].append(dict(zip(OUTPUT_COLUMNS, row, strict=True)))
    return out


def predictions_by_row(table, count: int) -> list[list[dict]]:
    """The pyfunc output table split per input row (records, as the scoring protocol returns them)."""
    records = table.to_dict(orient="records") if len(table) else []
    out: list[list[dict]] = [[] for _ in range(count)]
    for record in records:
        record = {k: (v.item() if hasattr(v, "item") else v) for k, v in record.items()}
        out[int(record["row"])].append(record)
    return out
