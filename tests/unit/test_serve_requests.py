"""What ``detloop serve`` accepts: the MLflow scoring formats, and a 4xx naming the problem for bad input.

Also the alias watcher's swap rules, against a real MLflow registry (the loader returns a stand-in model).
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import pytest
from tests.conftest import register_version
from tests.serving_helpers import page_bytes

from detloop.core.errors import BadInput
from detloop.production.batching import Batcher, _Job
from detloop.production.reports import yolo_lines
from detloop.production.request_checks import (
    Limits,
    RequestRefused,
    parse_frame,
    parse_report,
    parse_request,
    plain_images,
)
from detloop.production.swap import ModelWatcher, ServedModel
from detloop.tracking import oversight, registry

LIMITS = Limits(max_body_bytes=1 << 20, max_image_bytes=200_000, max_pixels=100_000, max_images=4, min_side=10)
JSON = "application/json"


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def body(payload) -> bytes:
    return json.dumps(payload).encode()


def refused(data: bytes, content_type: str | None = JSON, limits: Limits = LIMITS) -> RequestRefused:
    with pytest.raises(RequestRefused) as info:
        parse_request(data, content_type, limits)
    return info.value


@pytest.mark.parametrize(
    "payload",
    [
        {"dataframe_split": {"columns": ["image"], "data": [["A"], ["B"]]}},
        {"dataframe_records": [{"image": "A"}, {"image": "B"}]},
        {"inputs": {"image": ["A", "B"]}},
        {"inputs": [{"image": "A"}, {"image": "B"}]},
        {"instances": [{"image": "A"}, {"image": "B"}]},
    ],
)
def test_every_mlflow_scoring_format_is_accepted(payload):
    pages = {"A": page_bytes(1), "B": page_bytes(2, fmt="PNG")}
    text = json.dumps(payload)
    for key, raw in pages.items():
        text = text.replace(f'"{key}"', json.dumps(b64(raw)))
    images = parse_request(text.encode(), "application/json; charset=utf-8", LIMITS)
    assert [im.raw for im in images] == [pages["A"], pages["B"]]
    assert [(im.format, im.width, im.height, im.suffix) for im in images] == [
        ("jpeg", 96, 120, ".jpg"),
        ("png", 96, 120, ".png"),
    ]


@pytest.mark.parametrize(
    "payload",
    [
        {"dataframe_split": {"columns": ["image"], "data": [["A"], ["B"]]}},
        {"dataframe_split": {"columns": ["image"], "data": [["A"]], "index": [7]}},
        {"dataframe_records": [{"image": "A"}, {"image": "B"}, {"image": "A"}]},
    ],
)
def test_the_common_shapes_read_without_a_table_give_what_mlflows_parser_gives(payload):
    assert plain_images(payload) == parse_frame(payload)["image"].tolist()


@pytest.mark.parametrize(
    "payload",
    [
        {"dataframe_split": {"columns": ["image", "note"], "data": [["A", "x"]]}},
        {"dataframe_split": {"columns": ["image"], "data": [[5]]}},
        {"dataframe_split": {"columns": ["image"], "data": []}},
        {"dataframe_split": {"columns": ["image"], "data": [["A"]], "index": [1, 2]}},
        {"dataframe_split": {"columns": ["image"], "data": [["A"]], "dtypes": ["str"]}},
        {"dataframe_records": []},
        {"dataframe_records": [{"image": "A", "note": "x"}]},
        {"dataframe_records": [{"image": None}]},
        {"dataframe_records": [{"image": "A"}], "params": {"conf": 0.5}},
        {"inputs": {"image": ["A"]}},
        {"instances": [{"image": "A"}]},
    ],
)
def test_every_other_shape_is_left_to_mlflows_parser(payload):
    assert plain_images(payload) is None


def test_a_raw_image_body_is_one_image():
    (image,) = parse_request(page_bytes(3), "image/jpeg", LIMITS)
    assert image.width == 96 and len(image.sha256) == 64


def truncated_jpeg() -> bytes:
    raw = page_bytes(4)
    return raw[: len(raw) // 2]


def big_png(size=(400, 400)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, "white").save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "content_type", "status", "message"),
    [
        (b"", JSON, 400, "empty request: the body holds no data"),
        (b'{"dataframe_split": ', JSON, 400, "malformed JSON: Expecting value at line 1 column 21"),
        (b"\xff\xfe{}", JSON, 400, "malformed JSON: the body is not UTF-8 text"),
        (b"[1, 2]", JSON, 400, "the JSON body must be an object"),
        (body({"image": "x"}), JSON, 400, "needs exactly one of dataframe_split"),
        (body({"dataframe_split": "x"}), JSON, 400, "dataframe_split: cannot be read as a table"),
        (body({"dataframe_records": []}), JSON, 400, "the input table needs a column 'image'"),
        (body({"inputs": {"image": []}}), JSON, 400, "no images in the request"),
        (body({"dataframe_records": [{"img": "x"}]}), JSON, 400, "needs a column 'image'; got columns ['img']"),
        (body({"dataframe_records": [{"image": 5}]}), JSON, 400, "row 0: 'image' must be a base64 string; got int"),
        (body({"dataframe_records": [{"image": "/etc/passwd"}]}), JSON, 400, "row 0: 'image' is not valid base64"),
        (
            body({"dataframe_records": [{"image": b64(b"%PDF-1.4 not an image")}]}),
            JSON,
            400,
            "row 0: not a decodable image",
        ),
        (body({"dataframe_records": [{"image": b64(truncated_jpeg())}]}), JSON, 400, "row 0: truncated"),
        (
            body({"dataframe_records": [{"image": b64(big_png())}]}),
            JSON,
            413,
            "row 0: image of 400x400 px is larger than serve.limits.max_pixels=100000",
        ),
        (
            body({"dataframe_records": [{"image": b64(page_bytes(5, (8, 8)))}]}),
            JSON,
            400,
            "row 0: image is 8x8 px, smaller than serve.limits.min_side=10 px",
        ),
        (
            body({"inputs": {"image": [b64(page_bytes(i)) for i in range(5)]}}),
            JSON,
            413,
            "5 images in one request; serve.limits.max_images=4",
        ),
        (b"hello", "text/plain", 415, "unsupported Content-Type 'text/plain'"),
        (b"hello", None, 415, "unsupported Content-Type '(none)'"),
        (b"hello", "image/png", 400, "body: not a decodable image"),
    ],
)
def test_bad_input_is_refused_with_a_4xx_naming_the_problem(data, content_type, status, message):
    err = refused(data, content_type)
    assert err.status == status
    assert message in err.render()


def test_an_image_over_the_byte_limit_is_413_before_decoding():
    limits = Limits(1 << 20, max_image_bytes=1000, max_pixels=10**8, max_images=4, min_side=10)
    err = refused(body({"dataframe_records": [{"image": b64(page_bytes(6))}]}), limits=limits)
    assert err.status == 413 and "serve.limits.max_image_bytes=1000" in err.summary


def test_a_local_path_is_read_only_when_allowed(tmp_path):
    path = tmp_path / "page.jpg"
    path.write_bytes(page_bytes(7))
    payload = body({"dataframe_records": [{"image": str(path)}]})
    assert "serve.limits.allow_paths=false" in refused(payload).summary
    allowed = Limits(1 << 20, 200_000, 100_000, 4, 10, allow_paths=True)
    assert parse_request(payload, JSON, allowed)[0].raw == path.read_bytes()


def test_a_report_takes_json_with_a_note_or_a_raw_image():
    raw = page_bytes(8)
    image, note = parse_report(body({"image": b64(raw), "note": "missed the date"}), JSON, None, LIMITS)
    assert image.raw == raw and note == "missed the date"
    image, note = parse_report(raw, "image/jpeg", "from the query", LIMITS)
    assert image.raw == raw and note == "from the query"
    with pytest.raises(RequestRefused, match="a report needs the key 'image'"):
        parse_report(body({"picture": "x"}), JSON, None, LIMITS)
    with pytest.raises(RequestRefused, match="'note' must be a string"):
        parse_report(body({"image": b64(raw), "note": 3}), JSON, None, LIMITS)


def test_proposed_labels_are_yolo_lines_without_degenerate_boxes():
    dets = [
        {"class_id": 2, "xc": 0.5, "yc": 0.25, "w": 0.1, "h": 0.2},
        {"class_id": 1, "xc": 0.5, "yc": 0.5, "w": 0.0, "h": 0.2},
        {"class_id": 0, "xc": 1.0000004, "yc": 0.5, "w": 0.1, "h": 0.2},
    ]
    assert yolo_lines(dets) == ["2 0.500000 0.250000 0.100000 0.200000", "0 1.000000 0.500000 0.100000 0.200000"]


# --------------------------------------------------------------------------- the alias watcher


def loader_from(loads: list[str], broken: set[str] = frozenset()):
    """A loader that records which versions it loaded (the model object itself is not used here)."""

    def load(name: str, version: str) -> ServedModel:
        if version in broken:
            raise OSError(f"weights of v{version} are unreadable")
        loads.append(version)
        return ServedModel(name, version, model=object(), loaded_at="now")

    return load


def test_the_watcher_swaps_in_the_new_alias_holder_and_keeps_serving_on_trouble(registry_cfg):
    name = registry_cfg.mlflow.registered_model
    v1, v2, v3 = (register_version(registry_cfg) for _ in range(3))
    loads: list[str] = []
    watcher = ModelWatcher(name, "production", 60, loader=loader_from(loads, broken={v3}))
    # no holder yet: nothing to serve (bad input, exit 2)
    with pytest.raises(BadInput, match="nothing to serve: no version of .* holds 'production'"):
        watcher.load()
    registry.move_alias(registry_cfg, "production", v1, why="test")
    assert watcher.load().version == v1
    assert watcher.check() is False and loads == [v1]  # unchanged alias: nothing loaded
    # a promotion: the new holder is loaded and swapped in
    registry.move_alias(registry_cfg, "production", v2, why="test")
    assert watcher.check() is True and watcher.current.version == v2
    assert watcher.state.swaps[-1]["from"] == v1 and watcher.state.swaps[-1]["to"] == v2
    # a version that fails to load: v2 keeps serving, the error is shown, and it is not retried every poll
    registry.move_alias(registry_cfg, "production", v3, why="test")
    assert watcher.check() is False and watcher.current.version == v2
    assert f"loading v{v3} failed" in watcher.state.error
    assert watcher.check() is False and loads == [v1, v2]
    # a rollback to v1 is picked up and clears the error
    registry.move_alias(registry_cfg, "production", v1, why="rollback")
    assert watcher.check() is True and watcher.current.version == v1 and watcher.state.error is None


def test_a_move_made_outside_detloop_is_recorded_before_its_version_is_served(registry_cfg):
    """The UI moves the alias just after one oversight check: the watcher must not serve it unrecorded."""
    name = registry_cfg.mlflow.registered_model
    v1, v2 = (register_version(registry_cfg, tags={"decision": "pass", "gate.decision": "pass"}) for _ in range(2))
    registry.move_alias(registry_cfg, "production", v1, why="test")
    moved_in_ui = []

    def oversee():
        found = oversight.watch(registry_cfg, ("production",), seen_by="serve")
        if not moved_in_ui:  # the person's click lands right after this check
            registry.client().set_registered_model_alias(name, "production", v2)
            moved_in_ui.append(v2)
        return found

    watcher = ModelWatcher(name, "production", 60, loader=loader_from([]), oversee=oversee)
    assert watcher.load().version == v1
    for _ in range(3):  # whenever v2 is swapped in, its move is already in the audit trail
        swapped = watcher.check()
        recorded = [(m["to_version"], m["external"]) for m in registry.history(registry_cfg) if m["external"]]
        assert recorded == ([(v2, True)] if swapped or watcher.current.version == v2 else [])
    assert watcher.current.version == v2


# --------------------------------------------------------------------------- batching


class GatedModel:
    """A stand-in for the pyfunc: one detection per row (its width as class id); the first call waits for a gate."""

    def __init__(self):
        self.calls: list[int] = []
        self.gate = threading.Event()

    def predict(self, frame):
        import pandas as pd

        if not self.calls:
            self.gate.wait(10)
        self.calls.append(len(frame))
        sizes = [parse_request(base64.b64decode(v), "image/jpeg", LIMITS)[0].width for v in frame["image"]]
        return pd.DataFrame([{"row": i, "class_id": w} for i, w in enumerate(sizes)])


def test_requests_queued_while_the_model_is_busy_are_scored_together_by_version_and_size():
    model = GatedModel()
    batcher = Batcher(max_images=3)
    v1, v2 = ServedModel("m", "1", model, "now"), ServedModel("m", "2", model, "now")
    image = {w: parse_request(page_bytes(w, (w, 40)), "image/jpeg", LIMITS)[0] for w in (40, 50)}
    jobs = [
        (v1, [image[40]]),  # runs first and holds the model until the gate opens
        (v1, [image[40]]),
        (v1, [image[40], image[40]]),  # same version and size: one call (3 images)
        (v1, [image[40]]),  # would make 4 > max_images: next call
        (v1, [image[50]]),
        (v2, [image[40]]),
    ]  # other size, other version: calls of their own
    results: dict[int, list] = {}
    threads = []
    for k, (served, images) in enumerate(jobs):

        def call(k=k, served=served, images=images):
            results[k] = batcher.predict(served, images)

        threads.append(threading.Thread(target=call))
        threads[-1].start()
        deadline = time.time() + 5
        while len(batcher._queue) + (1 if model.calls or batcher._busy else 0) < k + 1 and time.time() < deadline:
            time.sleep(0.01)
    model.gate.set()
    for t in threads:
        t.join(10)
    # then each request got its own rows back, and the 5 queued requests took 4 model calls
    assert model.calls == [1, 3, 1, 1, 1] and batcher.calls == 5
    assert [[[d["class_id"] for d in dets] for dets in results[k]] for k in range(6)] == [
        [[40]],
        [[40]],
        [[40], [40]],
        [[40]],
        [[50]],
        [[40]],
    ]
    assert [d["row"] for dets in results[2] for d in dets] == [0, 1]  # rows of the request, not of the batch


def test_a_failing_batch_is_retried_request_by_request():
    class Picky:
        def predict(self, frame):
            if len(frame) > 1:
                raise RuntimeError("batch failed")
            return pd.DataFrame([{"row": 0, "class_id": 7}])

    import pandas as pd

    batcher = Batcher(max_images=4)
    served = ServedModel("m", "1", Picky(), "now")
    image = parse_request(page_bytes(1), "image/jpeg", LIMITS)[0]
    batch = [_Job(served, [image]), _Job(served, [image])]
    batcher._run(batch)
    assert [job.result for job in batch] == [[[{"row": 0, "class_id": 7}]]] * 2 and batcher.calls == 3
    with pytest.raises(BadInput, match="serve.batch_images=0"):
        Batcher(0)


def test_under_many_threads_every_request_gets_its_own_answer_and_the_model_is_handed_over():
    """16 threads, 25 requests each, a model that takes a little time: each request is answered with its own
    rows, no thread is left waiting, calls are batched, and the model never runs twice at once."""
    import pandas as pd

    class Slow:
        def __init__(self):
            self.running, self.overlaps, self.calls = 0, 0, 0
            self.lock = threading.Lock()

        def predict(self, frame):
            with self.lock:
                self.running += 1
                self.overlaps += self.running > 1
            time.sleep(0.002)
            widths = [parse_request(base64.b64decode(v), "image/jpeg", LIMITS)[0].width for v in frame["image"]]
            with self.lock:
                self.running -= 1
                self.calls += 1
            return pd.DataFrame([{"row": i, "class_id": w} for i, w in enumerate(widths)])

    model, batcher = Slow(), Batcher(max_images=6)
    served = ServedModel("m", "1", model, "now")
    images = {w: parse_request(page_bytes(w, (w, 40)), "image/jpeg", LIMITS)[0] for w in (40, 50)}
    wrong: list[tuple] = []

    def client(k: int) -> None:  # two image sizes, one to three images per request
        width, count = (40, 50)[k % 2], 1 + k % 3
        for _ in range(25):
            answer = batcher.predict(served, [images[width]] * count)
            if [[(d["class_id"], d["row"]) for d in dets] for dets in answer] != [[(width, r)] for r in range(count)]:
                wrong.append((k, answer))

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(16)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "requests left waiting for the model"
    assert wrong == [] and model.overlaps == 0
    assert batcher.calls == model.calls < 16 * 25 and not batcher._busy and batcher._queue == []
