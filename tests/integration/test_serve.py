"""``detloop serve`` as a subprocess on real registered models: scoring, bad input, reports, load, promotion.

Two registered pyfunc versions of an untrained yolov8n (no download, no training) whose class biases
differ, so each answer shows which model produced it: v1 finds ``names[0]`` everywhere, v2 ``names[1]``.
Every answer carries a request id; at the end the prediction log holds exactly those requests.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import requests
from PIL import Image
from tests.conftest import tiny_overrides, wait_healthy
from tests.serving_helpers import anchor_classes, detector_weights, page_bytes, register_detector

from detloop.cli.main import main
from detloop.core.config import compose, resolve_path
from detloop.core.env import free_port
from detloop.core.errors import BadInput
from detloop.data.manifest import read_manifest
from detloop.production import predlog
from detloop.production.service import serve_workers
from detloop.tracking import registry
from detloop.tracking.promotion import promote_version, rollback

pytestmark = pytest.mark.integration

DETLOOP = str(Path(sys.executable).parent / "detloop")
SENT: list[str] = []  # request ids of every answer the server gave in this module


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_data):
    """Given a tiny project (anchor, pool, inbox) whose registry holds v1 (production) and v2."""
    base = tmp_path_factory.mktemp("serve")
    shutil.copytree(tiny_data, base / "data")
    overrides = [
        *tiny_overrides(base),
        "serve.poll_seconds=0.5",
        "serve.limits.max_body_bytes=3000000",
        "serve.limits.max_pixels=1000000",
        "monitor.mlflow.log=false",
    ]
    cfg = compose(overrides)
    names = anchor_classes(base / "data")
    v1 = register_detector(cfg, detector_weights(base / "v1.pt", names, hot_class=0))
    v2 = register_detector(cfg, detector_weights(base / "v2.pt", names, hot_class=1))
    registry.move_alias(cfg, "production", v1, why="test bootstrap", decision="bootstrap")
    return {"cfg": cfg, "overrides": overrides, "base": base, "names": names, "v1": v1, "v2": v2}


@pytest.fixture(scope="module")
def server(project):
    """``detloop serve`` on a free loopback port, stopped (SIGTERM) at the end of the module."""
    port = free_port()
    stderr = open(project["base"] / "serve.log", "w")  # noqa: SIM115  (closed below)
    proc = subprocess.Popen(
        [DETLOOP, "serve", "--port", str(port), *project["overrides"]], stdout=subprocess.DEVNULL, stderr=stderr
    )
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, "detloop serve", timeout=180, log=project["base"] / "serve.log")
    yield {"url": url, "proc": proc}
    if proc.poll() is None:
        proc.kill()
    stderr.close()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def post(server, path: str, data: bytes, content_type: str | None = "application/json", **kwargs):
    headers = {"Content-Type": content_type} if content_type else {}
    answer = requests.post(f"{server['url']}{path}", data=data, headers=headers, timeout=60, **kwargs)
    if "request_id" in answer.json():
        SENT.append(answer.json()["request_id"])
    return answer


def score(server, pages: list[bytes]):
    payload = {"dataframe_split": {"columns": ["image"], "data": [[b64(p)] for p in pages]}}
    return post(server, "/invocations", json.dumps(payload).encode())


def turned_by_exif(jpeg: bytes) -> bytes:
    """The JPEG stored sideways with an EXIF orientation tag (6: shown turned 90 degrees clockwise)."""
    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as im:
        sideways = im.transpose(Image.Transpose.ROTATE_90)
        exif = Image.Exif()
        exif[0x0112] = 6
        out = io.BytesIO()
        sideways.save(out, "JPEG", quality=95, exif=exif.tobytes())
    return out.getvalue()


def test_the_server_decodes_each_image_once_and_answers_as_the_pyfunc(project, monkeypatch):
    # given the served version loaded as the server loads it, and a count of the pyfunc's own decodes
    from detloop.model import pyfunc
    from detloop.production.batching import Batcher
    from detloop.production.request_checks import Limits, parse_request
    from detloop.production.swap import load_version

    served = load_version(project["cfg"].mlflow.registered_model, project["v1"])
    decoded: list[int] = []
    real = pyfunc.decode_image
    monkeypatch.setattr(pyfunc, "decode_image", lambda value, row: decoded.append(row) or real(value, row))
    pages = [page_bytes(21), page_bytes(22, (200, 150), "PNG"), turned_by_exif(page_bytes(23))]
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[b64(p)] for p in pages]}}).encode()
    # when the server path scores the request (checked images, then the batcher)
    images = parse_request(body, "application/json", Limits.from_cfg(project["cfg"]))
    answered = Batcher(8).predict(served, images)
    # then the model got the pixels the check decoded (no second decode) and answered as predict() does
    assert decoded == []
    direct = served.model.predict(pd.DataFrame({"image": [b64(p) for p in pages]}))
    assert decoded == [0, 1, 2] and len(direct) > 0
    assert [d for dets in answered for d in dets] == direct.to_dict(orient="records")


def test_health_names_the_served_version(project, server):
    health = requests.get(f"{server['url']}/health", timeout=10).json()
    assert health["status"] == "ok" and health["version"] == project["v1"] and health["alias"] == "production"
    # served from the ONNX export logged with the version, on ONNX Runtime's CPU provider
    assert health["runtime"] == "onnx" and health["providers"] == ["CPUExecutionProvider"]
    # on every CPU the server may use (serve.threads=null, base.predict.threads=null)
    from detloop.model.runtime import cpu_threads

    assert health["threads"] == cpu_threads()
    assert requests.get(f"{server['url']}/version", timeout=10).json()["model_version"] == project["v1"]


def test_scoring_answers_with_the_models_own_predictions_and_version(project, server):
    pages = [page_bytes(11), page_bytes(12, (200, 150), "PNG")]
    answer = score(server, pages)
    assert answer.status_code == 200 and answer.headers["X-Model-Version"] == project["v1"]
    body = answer.json()
    assert body["model_version"] == project["v1"] and [im["width"] for im in body["images"]] == [96, 200]
    served = pd.DataFrame(body["predictions"])
    assert set(served["class_name"]) == {project["names"][0]} and set(served["row"]) == {0, 1}
    # the same detections as the registered pyfunc called directly on the same input
    model = mlflow.pyfunc.load_model(f"models:/{project['cfg'].mlflow.registered_model}/{project['v1']}")
    direct = model.predict(pd.DataFrame({"image": [b64(p) for p in pages]}))
    pd.testing.assert_frame_equal(served[direct.columns.tolist()], direct, check_dtype=False)
    # and the other scoring formats and a raw image body are answered the same way
    for payload in ({"dataframe_records": [{"image": b64(pages[0])}]}, {"inputs": {"image": [b64(pages[0])]}}):
        again = post(server, "/invocations", json.dumps(payload).encode()).json()
        assert again["predictions"] == [p for p in body["predictions"] if p["row"] == 0]
    raw = post(server, "/invocations", pages[0], "image/jpeg").json()
    assert raw["predictions"] == again["predictions"]


def test_mlflow_models_serve_gives_the_same_predictions_for_the_same_request(project, server):
    """The contract is MLflow's: its own scoring server on the same version answers the same payload alike."""
    import os

    from detloop.tracking import store

    payload = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[b64(page_bytes(15))]]}}).encode()
    ours = post(server, "/invocations", payload).json()
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": store.tracking_uri(project["cfg"]),
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }
    uri = f"models:/{project['cfg'].mlflow.registered_model}/{project['v1']}"
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "models",
            "serve",
            "-m",
            uri,
            "-p",
            str(port),
            "-h",
            "127.0.0.1",
            "--env-manager",
            "local",
            "-w",
            "1",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).ok:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        theirs = requests.post(
            f"http://127.0.0.1:{port}/invocations",
            data=payload,
            timeout=60,
            headers={"Content-Type": "application/json"},
        ).json()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert theirs["predictions"] == ours["predictions"] and ours["predictions"]


def test_bad_input_gets_a_4xx_naming_the_problem_and_the_server_keeps_serving(project, server):
    page = page_bytes(13)
    big = io.BytesIO()
    Image.new("RGB", (1200, 1000), "white").save(big, "PNG")  # small in bytes, over the pixel limit
    big = big.getvalue()
    cases = [
        (b"", "application/json", 400, "empty request"),
        (b'{"dataframe_split": {', "application/json", 400, "malformed JSON"),
        (b"plain text", "text/plain", 415, "unsupported Content-Type"),
        (json.dumps({"dataframe_records": [{"img": b64(page)}]}).encode(), "application/json", 400, "column 'image'"),
        (
            json.dumps({"dataframe_records": [{"image": "not base64!"}]}).encode(),
            "application/json",
            400,
            "row 0: 'image' is not valid base64",
        ),
        (
            json.dumps({"inputs": {"image": [b64(b"GIF89a not really")]}}).encode(),
            "application/json",
            400,
            "row 0: not a decodable image",
        ),
        (json.dumps({"inputs": {"image": [b64(page[:-400])]}}).encode(), "application/json", 400, "row 0: truncated"),
        (page[:-400], "image/jpeg", 400, "body: truncated"),
        (big, "image/png", 413, "serve.limits.max_pixels=1000000"),
        (b"x" * 3_000_001, "application/json", 413, "serve.limits.max_body_bytes=3000000"),
    ]
    for data, content_type, status, message in cases:
        answer = post(server, "/invocations", data, content_type)
        assert answer.status_code == status, (message, answer.text)
        assert message in answer.json()["error"], answer.json()
    # the server is still up and answering
    assert score(server, [page]).status_code == 200
    # and every refused request is in the log with its status and error
    store = predlog.open_log(project["cfg"])
    refused = [r for r in store.rows() if r["status"] >= 400]
    store.close()
    assert sorted(r["status"] for r in refused) == sorted(c[2] for c in cases)
    assert all(r["error"] and r["model_version"] == project["v1"] for r in refused)


def test_a_reported_failure_lands_in_the_inbox_with_the_production_prediction(project, server):
    cfg, names = project["cfg"], project["names"]
    inbox = resolve_path(cfg, "inbox")
    before = len(read_manifest(inbox / "manifest.jsonl"))
    page = page_bytes(21, (160, 200))
    answer = post(server, "/report", json.dumps({"image": b64(page), "note": "missed the amount"}).encode())
    assert answer.status_code == 201, answer.text
    report = answer.json()
    rows = {r["id"]: r for r in read_manifest(inbox / "manifest.jsonl")}
    assert len(rows) == before + 1 and rows[report["id"]]["note"] == "missed the amount"
    assert rows[report["id"]]["has_labels"] and report["proposed_labels"] > 0
    labels = (inbox / "labels" / f"{report['id']}.txt").read_text().splitlines()
    assert len(labels) == report["proposed_labels"] and {line.split()[0] for line in labels} == {"0"}
    assert {p["class_name"] for p in report["predictions"]} == {names[0]}
    # the same image again is a duplicate report (409), an anchor test image is test leakage (422)
    again = post(server, "/report", page, "image/jpeg")
    assert again.status_code == 409 and "duplicate of inbox sample" in again.json()["error"]
    test_image = next((project["base"] / "data/anchor/images/test").iterdir()).read_bytes()
    leak = post(server, "/report", test_image, "image/jpeg")
    assert leak.status_code == 422 and "test leakage" in leak.json()["error"]


def test_detloop_report_adds_an_image_with_the_production_prediction(project, capsys):
    image = project["base"] / "user" / "failed.jpg"
    image.parent.mkdir()
    image.write_bytes(page_bytes(22, (160, 200)))
    assert main(["report", str(image), "--note", "stamp missed", *project["overrides"]]) == 0
    out = capsys.readouterr().out
    assert f"reported {image} as report-" in out and f"v{project['v1']} detected" in out
    rows = read_manifest(resolve_path(project["cfg"], "inbox") / "manifest.jsonl")
    assert rows[-1]["source"] == str(image) and rows[-1]["note"] == "stamp missed" and rows[-1]["has_labels"]
    # the same image again is refused with the reason (exit 2)
    assert main(["report", str(image), *project["overrides"]]) == 2
    assert "duplicate of inbox sample" in capsys.readouterr().err


def test_a_bounded_load_loses_no_request_and_no_log_row(project, server):
    pages = [page_bytes(100 + i) for i in range(20)]
    store = predlog.open_log(project["cfg"])
    before = store.count()
    calls = requests.get(f"{server['url']}/health", timeout=10).json()["model_calls"]

    def one(i: int):
        return score(server, [pages[i % len(pages)]])

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(one, range(200)))
    assert [a.status_code for a in answers] == [200] * 200
    ids = {a.json()["request_id"] for a in answers}
    assert len(ids) == 200
    assert {p["row"] for a in answers for p in a.json()["predictions"]} == {0}  # rows of each request
    rows = [r for r in store.rows() if r["request_id"] in ids]
    assert store.count() - before == 200 and len(rows) == 200
    assert all(r["status"] == 200 and r["n_detections"] > 0 and r["latency_ms"] > 0 for r in rows)
    store.close()
    # requests that queued while the model was busy were scored together (same-size pages)
    assert requests.get(f"{server['url']}/health", timeout=10).json()["model_calls"] - calls < 200


def wait_for_version(server, version: str, timeout: float = 90.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        health = requests.get(f"{server['url']}/health", timeout=10).json()
        if health["version"] == version:
            return health
        time.sleep(0.2)
    raise AssertionError(f"still serving v{health['version']} {timeout} s after the alias moved: {health}")


def test_a_promotion_and_a_rollback_are_served_without_a_restart(project, server):
    cfg, names, v1, v2 = project["cfg"], project["names"], project["v1"], project["v2"]
    promoted_at = time.time()
    promote_version(cfg, v2, reviewer="qa", reason="better on the new layout")
    health = wait_for_version(server, v2)
    assert health["swaps"][-1] == {"from": v1, "to": v2, "at": health["loaded_at"]}
    answers = [score(server, [page_bytes(31 + i)]).json() for i in range(25)]
    assert {a["model_version"] for a in answers} == {v2}
    assert {p["class_name"] for a in answers for p in a["predictions"]} == {names[1]}  # the new model answers
    project["v2_window"] = (promoted_at, time.time())
    rollback(cfg, reviewer="qa", reason="test rollback")
    wait_for_version(server, v1)
    assert score(server, [page_bytes(60)]).json()["model_version"] == v1
    assert server["proc"].poll() is None  # the same process throughout


def test_the_monitor_alerts_when_the_served_model_stops_finding_a_class(project, capsys):
    # the window in which v2 served: it finds names[1] in every image and names[0] in none
    since, until = (datetime.fromtimestamp(t, UTC).isoformat() for t in project["v2_window"])
    args = [
        "monitor",
        "--since",
        since,
        "--until",
        until,
        *project["overrides"],
        "monitor.min_images=1",
        "monitor.baseline.min_images=1",
    ]
    assert main([*args, f"monitor.expected_classes=[{project['names'][0]}]"]) == 1
    out = capsys.readouterr().out
    assert f"ALERT [detection_rate] {project['names'][0]} detected in 0.00% of 25 images" in out
    assert main([*args, f"monitor.expected_classes=[{project['names'][1]}]"]) == 0
    assert "no alerts" in capsys.readouterr().out


def test_abset_draws_from_the_served_images(project):
    assert main(["abset", "build", "--size", "5", *project["overrides"]]) == 0
    pending = read_manifest(resolve_path(project["cfg"], "data") / "abset/inbox/manifest.jsonl")
    assert len(pending) == 5 and all(r["has_labels"] for r in pending)


def worker_pids(url: str, count: int, timeout: float = 180.0, without: int | None = None) -> dict[int, dict]:
    """``/health`` of each of ``count`` worker processes (new connections land on any worker), by pid."""
    seen: dict[int, dict] = {}
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            health = requests.get(f"{url}/health", timeout=10).json()
        except requests.RequestException:
            time.sleep(0.2)
            continue
        if health["worker"] != without:
            seen[health["worker"]] = health
        if len(seen) >= count:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"{count} workers did not all answer /health within {timeout} s: {sorted(seen)}")


def gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return True
        if "State:\tZ" in status:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
def test_several_workers_share_the_port_replace_a_dead_one_and_stop_together(project):
    # given detloop serve with two worker processes
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = project["base"] / "serve-workers.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [DETLOOP, "serve", "--port", str(port), *project["overrides"], "serve.workers=2"],
            stdout=subprocess.DEVNULL,
            stderr=out,
        )
    workers = {"url": url, "proc": proc}
    pids: dict[int, dict] = {}
    try:
        wait_healthy(url, proc, "detloop serve serve.workers=2", timeout=180, log=log)
        pids = worker_pids(url, 2)
        assert all(h["workers"] == 2 and h["version"] == project["v1"] for h in pids.values())
        # when 48 requests come from 8 threads, each on a new connection
        pages = [page_bytes(200 + i) for i in range(8)]
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(lambda i: score(workers, [pages[i % len(pages)]]), range(48)))
        # then each is answered and logged, and both workers scored some
        assert [a.status_code for a in answers] == [200] * 48
        ids = {a.json()["request_id"] for a in answers}
        store = predlog.open_log(project["cfg"])
        assert ids <= {r["request_id"] for r in store.rows()}
        store.close()
        calls = {pid: h["model_calls"] for pid, h in worker_pids(url, 2).items()}
        assert set(calls) == set(pids) and all(n > 0 for n in calls.values()), calls
        # when one worker is killed, another takes its place and the server keeps answering
        victim = sorted(pids)[0]
        signal_pid(victim, signal.SIGKILL)
        assert gone(victim)
        pids = worker_pids(url, 2, without=victim)
        assert victim not in pids and proc.poll() is None
        assert score(workers, [pages[0]]).status_code == 200
        # when detloop serve gets SIGTERM, it stops every worker and exits 0
        proc.terminate()
        assert proc.wait(timeout=60) == 0
        assert all(gone(pid) for pid in pids)
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in pids:
            signal_pid(pid, signal.SIGKILL)


def signal_pid(pid: int, sig: int) -> None:
    import contextlib
    import os

    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


@pytest.mark.slow
def test_a_worker_that_cannot_start_stops_the_server_with_its_reason(project):
    import socket

    # given a port another program listens on
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # when detloop serve starts two workers on it
        done = subprocess.run(
            [DETLOOP, "serve", "--port", str(port), *project["overrides"], "serve.workers=2"],
            capture_output=True,
            text=True,
            timeout=300,
        )
    # then it exits 2 with the reason, no traceback
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"error: a server worker could not start: serve: cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_bad_worker_count_is_refused_naming_the_key():
    with pytest.raises(BadInput, match="serve.workers: must be a whole number >= 1, got 0"):
        serve_workers(compose(["serve.workers=0"]))


def test_stopping_the_server_keeps_every_answered_request_in_the_log(project, server):
    server["proc"].terminate()  # uvicorn shuts down gracefully, then re-raises SIGTERM as its exit status
    assert server["proc"].wait(timeout=30) == -signal.SIGTERM
    store = predlog.open_log(project["cfg"])
    logged = {r["request_id"] for r in store.rows()}
    store.close()
    assert set(SENT) <= logged and len(SENT) == len(set(SENT))
    assert logged - set(SENT) == set()
