"""``detloop serve`` under load, against calling the same registered model directly in Python.

In a work folder it writes the tiny demo data set (its 40 rendered 256x320 document pages are the
request images), registers a yolov8n with the demo's six classes as a pyfunc version (the demo's
architecture and ``imgsz: 160``; untrained, since only time is measured, so it returns few boxes) and
gives it ``production``. Then, on the same images in the same order:

* **direct**: ``mlflow.pyfunc.load_model(...).predict`` on a one-row table (base64 image), one call at
  a time in this process; and **direct, batched**: eight rows per call (the model's throughput ceiling);
  both as served (the version's ONNX export on ONNX Runtime) and, alternating with it, with the same
  version's PyTorch weights (``model_config={"runtime": "torch"}``): ``runtime_speedup``;
* **server, sequential**: ``detloop serve`` as a subprocess on 127.0.0.1, one request at a time
  (``dataframe_split`` JSON, one image per request), from a Python client (``requests``) and, when
  Debian's ``wrk`` is installed, from ``wrk`` with one connection (a native client: the server's own
  latency without the Python client's cost);
* **server, concurrent**: ``--requests`` requests (default 2,000) from ``--concurrency`` (8) client
  threads; every answer must be 200 and the prediction log must hold exactly one row per request;
* **server, saturated**: ``wrk`` with ``--saturate`` connections (default 16, twice the ceiling's batch),
  alternating round by round with the direct batched ceiling. The server runs with
  ``serve.batch_images=8``, the ceiling's batch, so both score at most 8 images per model call; with 16
  connections a full batch queues while another is scored. With 8 connections it cannot: the batcher
  never waits for a batch to fill, so 8 clients settle into two groups of about 4 images per call, and
  that figure compares 4-image calls with the 8-image ceiling. The images per model call are recorded
  for both (``/health``'s ``model_calls``).

Direct and server-sequential runs alternate for ``--rounds`` (3) rounds, so both see the same background
load; the serving overhead ratio is the server's sequential p50 latency over the direct p50 (the median
over the rounds), for each client. Under load, the
server's requests/s are compared with the direct batched images/s (its ceiling); the saturated share is
the median over the rounds of each round's ``wrk`` requests/s over that round's ceiling. The client
threads run on the same two cores as the server, so the concurrent figures include the client's cost.
Results go to ``build/benchmarks/serve_load.json`` (``--out``), with the load average next to each figure.
``--workers N`` runs every server figure against ``serve.workers=N`` processes (the direct ones are the
same); ``benchmarks/run_all.py`` runs it with 2 as ``serve_load_workers``.

    .venv/bin/python benchmarks/serve_load.py [--requests 2000] [--concurrency 8] [--saturate 16]
        [--workers 1] [--rounds 3] [--workdir PATH] [--out PATH]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DETLOOP_ROOT", str(ROOT))

import requests  # noqa: E402
import yaml  # noqa: E402
from shared import load_average, start_serve, write_report  # noqa: E402

import detloop  # noqa: E402,F401  (offline environment)
from detloop.core.config import compose  # noqa: E402

OUT = ROOT / "build" / "benchmarks" / "serve_load.json"
IMGSZ = 160
BATCH = 8  # images per call of the direct batched ceiling, and the server's serve.batch_images


def overrides_for(work: Path) -> list[str]:
    return [
        "experiment=tiny",
        f"paths.data={work / 'data'}",
        f"paths.build={work / 'build'}",
        f"mlflow.store_dir={work / 'mlruns'}",
        "mlflow.tracking_uri=null",
    ]


def register(cfg, work: Path, threads: int | None = None) -> str:
    """An untrained yolov8n with the demo's classes, logged as the detloop pyfunc and given production."""
    import mlflow
    import ultralytics

    from detloop.data.demo import CLASSES
    from detloop.model.pyfunc import log_detector
    from detloop.model.yolo import ultralytics as ul
    from detloop.tracking import registry, runs

    arch = yaml.safe_load((Path(ultralytics.__file__).parent / "cfg/models/v8/yolov8.yaml").read_text())
    arch["nc"] = len(CLASSES)
    (work / "arch").mkdir(exist_ok=True)
    (work / "arch" / "yolov8n.yaml").write_text(yaml.safe_dump(arch))
    model = ul().YOLO(str(work / "arch" / "yolov8n.yaml"))
    model.model.names = dict(enumerate(CLASSES))
    model.save(str(work / "weights.pt"))
    experiment_id = runs.setup(cfg)
    with mlflow.start_run(experiment_id=experiment_id, run_name="serve-load"):
        info = log_detector(
            work / "weights.pt",
            {"conf": 0.25, "iou": 0.7, "imgsz": IMGSZ, "threads": threads},
            registered_model_name=cfg.mlflow.registered_model,
        )
    version = str(info.registered_model_version)
    registry.move_alias(cfg, "production", version, why="serve load benchmark", decision="bootstrap")
    return version


def stats(latencies_ms: list[float], seconds: float) -> dict:
    ordered = sorted(latencies_ms)
    q = statistics.quantiles(ordered, n=100)
    return {
        "requests": len(ordered),
        "seconds": round(seconds, 2),
        "requests_per_s": round(len(ordered) / seconds, 1),
        "p50_ms": round(q[49], 2),
        "p95_ms": round(q[94], 2),
        "mean_ms": round(statistics.fmean(ordered), 1),
    }


def load_direct(cfg, runtime: str | None = None):
    """The production version loaded in this process and warmed up, as the server loads it (``runtime``:
    override the recorded ``auto``, e.g. ``torch`` for the PyTorch weights of the same version)."""
    import mlflow.pyfunc
    import pandas as pd

    config = {"runtime": runtime} if runtime else None
    model = mlflow.pyfunc.load_model(f"models:/{cfg.mlflow.registered_model}@production", model_config=config)
    model.predict(pd.DataFrame({"image": [_blank()]}))  # warm-up, as the server does when it loads
    return model


def _blank() -> str:
    from detloop.model.pyfunc import input_example

    return input_example()["image"][0]


def direct(model, images: list[str], n: int, batch: int = 1) -> dict:
    """The registered model called in this process, ``batch`` images per call (latency per call)."""
    import pandas as pd

    before, latencies = load_average(), []
    started = time.perf_counter()
    for i in range(0, n, batch):
        t = time.perf_counter()
        model.predict(pd.DataFrame({"image": [images[j % len(images)] for j in range(i, i + batch)]}))
        latencies.append((time.perf_counter() - t) * 1000)
    seconds = time.perf_counter() - started
    return {
        **stats(latencies, seconds),
        "batch": batch,
        "images_per_s": round(n / seconds, 1),
        "load_before": before,
        "load_after": load_average(),
    }


def over_http(url: str, images: list[str], n: int, concurrency: int) -> dict:
    """``n`` one-image requests from ``concurrency`` client threads (one session each)."""
    import threading

    local = threading.local()
    bodies = [json.dumps({"dataframe_split": {"columns": ["image"], "data": [[im]]}}).encode() for im in images]

    def one(i: int) -> tuple[int, float, str]:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        t = time.perf_counter()
        answer = session.post(
            f"{url}/invocations",
            data=bodies[i % len(bodies)],
            timeout=120,
            headers={"Content-Type": "application/json"},
        )
        elapsed = (time.perf_counter() - t) * 1000
        return answer.status_code, elapsed, answer.json().get("request_id", "")

    before = load_average()
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(one, range(n)))
    seconds = time.perf_counter() - started
    errors = sum(status != 200 for status, _, _ in results)
    return {
        **stats([ms for _, ms, _ in results], seconds),
        "concurrency": concurrency,
        "errors": errors,
        "request_ids": [rid for _, _, rid in results],
        "load_before": before,
        "load_after": load_average(),
    }


WRK_SCRIPT = """
local bodies, n = {}, 0
function init(args)
  for _, path in ipairs(args) do
    local f = assert(io.open(path, "rb")); bodies[#bodies + 1] = f:read("*a"); f:close()
  end
end
function request()
  n = n + 1
  return wrk.format("POST", "/invocations", {["Content-Type"] = "application/json"}, bodies[(n % #bodies) + 1])
end
function done(summary, latency, requests)
  io.write(string.format("DETLOOP %d %d %d %.3f %.3f %.1f\\n", summary.requests, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50) / 1000, latency:percentile(95) / 1000, summary.duration / 1e6))
end
"""


def model_calls(url: str) -> int | None:
    """The server's model calls so far (``/health``); None with several workers (each counts its own)."""
    health = requests.get(f"{url}/health", timeout=30).json()
    return int(health["model_calls"]) if int(health.get("workers") or 1) == 1 else None


def per_call(run: dict, before: int | None, after: int | None) -> float | None:
    """Requests (one image each) per model call during a ``wrk`` run (about: wrk counts what it finished);
    None when the calls are not known (several workers)."""
    return round(run["requests"] / (after - before), 2) if before is not None and after and after > before else None


def over_wrk(url: str, images: list[str], seconds: int, concurrency: int, work: Path) -> dict | None:
    """The same one-image requests from ``wrk`` (Debian's HTTP load generator, one thread, ``concurrency``
    connections): a client that costs the 2 shared cores far less than Python threads. None without wrk."""
    import subprocess

    wrk = shutil.which("wrk")
    if wrk is None:
        return None
    folder = work / "wrk"
    folder.mkdir(exist_ok=True)
    (folder / "send.lua").write_text(WRK_SCRIPT)
    bodies = []
    for i, im in enumerate(images):
        bodies.append(folder / f"{i}.json")
        bodies[-1].write_text(json.dumps({"dataframe_split": {"columns": ["image"], "data": [[im]]}}))
    before = load_average()
    cmd = [wrk, "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "60s", "-s", str(folder / "send.lua"), url]
    done = subprocess.run([*cmd, "--", *map(str, bodies)], capture_output=True, text=True, check=True)
    line = next(x for x in done.stdout.splitlines() if x.startswith("DETLOOP "))
    requests_, status_errors, socket_errors, p50, p95, took = line.split()[1:]
    return {
        "client": "wrk 1 thread",
        "concurrency": concurrency,
        "requests": int(requests_),
        "errors": int(status_errors) + int(socket_errors),
        "seconds": float(took),
        "requests_per_s": round(int(requests_) / float(took), 1),
        "p50_ms": float(p50),
        "p95_ms": float(p95),
        "load_before": before,
        "load_after": load_average(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests in the concurrent run")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads in the concurrent run")
    parser.add_argument("--sequential", type=int, default=200, help="calls per direct and sequential run")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="alternating direct / server sequential runs "
        "(the shared machine's load changes; the medians are reported)",
    )
    parser.add_argument("--threads", type=int, help="ONNX Runtime CPU threads in the model (default: all)")
    parser.add_argument("--wrk-seconds", type=int, default=15, help="length of the wrk run (when wrk is installed)")
    parser.add_argument(
        "--wrk-sequential-seconds", type=int, default=5, help="length of each round's one-connection wrk run"
    )
    parser.add_argument(
        "--saturate", type=int, default=2 * BATCH, help="wrk connections of the saturated run (default: 2 batches)"
    )
    parser.add_argument("--workers", type=int, default=1, help="the server's processes (serve.workers; default 1)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"the report (default {OUT.relative_to(ROOT)})")
    parser.add_argument("--saturate-seconds", type=int, default=8, help="length of each round's saturated wrk run")
    parser.add_argument("--workdir", type=Path, help="keep the work folder here (default: a temp folder, removed)")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="detloop-serve-load-"))
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "build" / "serve", ignore_errors=True)  # a fresh prediction log and image store
    overrides = overrides_for(work)
    cfg = compose(overrides)
    try:
        from detloop.data.demo import write_demo_data

        if not (work / "data" / "anchor").is_dir():
            write_demo_data(cfg)
        pages = sorted((work / "data" / "anchor" / "images").rglob("*.jpg"))
        images = [base64.b64encode(p.read_bytes()).decode() for p in pages]
        version = register(cfg, work, args.threads)
        result = {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "images": len(images),
            "image_size": "256x320 JPEG",
            "imgsz": IMGSZ,
            "version": version,
            "workers": args.workers,
        }
        model = load_direct(cfg)
        torch_model = load_direct(cfg, "torch")
        result["runtime"] = model.unwrap_python_model().runtime
        result["providers"] = model.unwrap_python_model().providers
        # the server's batches capped at the ceiling's (serve.batch_images), so the shares compare like with like
        server = [*overrides, f"serve.batch_images={BATCH}", f"serve.workers={args.workers}"]
        proc, url = start_serve(server, work / "serve.log")
        sent: set[str] = set()
        try:
            rounds, wrk_answered = [], 0
            for _ in range(args.rounds):  # alternate, so both see the same background load
                pair = {
                    "direct": direct(model, images, args.sequential),
                    "server": over_http(url, images, args.sequential, 1),
                    # the same one request at a time from a native client (no Python client cost)
                    "server_wrk": over_wrk(url, images, args.wrk_sequential_seconds, 1, work),
                    "direct_torch": direct(torch_model, images, args.sequential),
                }
                sent |= set(pair["server"].pop("request_ids"))
                pair["overhead_ratio_p50"] = round(pair["server"]["p50_ms"] / pair["direct"]["p50_ms"], 2)
                if pair["server_wrk"]:
                    wrk_answered += pair["server_wrk"]["requests"]
                    pair["overhead_ratio_p50_wrk"] = round(pair["server_wrk"]["p50_ms"] / pair["direct"]["p50_ms"], 2)
                rounds.append(pair)
            result["sequential_rounds"] = rounds
            batched = {"onnx": [], "torch": []}
            for _ in range(args.rounds):  # the ceiling of each runtime, alternating
                batched["onnx"].append(direct(model, images, args.sequential * 4, batch=BATCH))
                batched["torch"].append(direct(torch_model, images, args.sequential * 4, batch=BATCH))
            pick = {k: sorted(v, key=lambda r: r["images_per_s"])[len(v) // 2] for k, v in batched.items()}
            result["direct_batched"], result["direct_batched_torch"] = pick["onnx"], pick["torch"]
            result["direct_batched_rounds"] = batched
            result["server_concurrent"] = over_http(url, images, args.requests, args.concurrency)
            sent |= set(result["server_concurrent"].pop("request_ids"))
            calls = model_calls(url)
            result["server_concurrent_wrk"] = over_wrk(url, images, args.wrk_seconds, args.concurrency, work)
            if result["server_concurrent_wrk"]:
                wrk_answered += result["server_concurrent_wrk"]["requests"]
                result["server_concurrent_wrk"]["images_per_call"] = per_call(
                    result["server_concurrent_wrk"], calls, model_calls(url)
                )
            saturated = []
            for _ in range(args.rounds if shutil.which("wrk") else 0):  # the ceiling and the saturated server
                ceiling = direct(model, images, args.sequential * 4, batch=BATCH)
                calls = model_calls(url)
                run = over_wrk(url, images, args.saturate_seconds, args.saturate, work)
                run["images_per_call"] = per_call(run, calls, model_calls(url))
                wrk_answered += run["requests"]
                share = round(run["requests_per_s"] / ceiling["images_per_s"], 2)
                saturated.append({"ceiling": ceiling, "server_wrk": run, "share_of_batched_ceiling": share})
            if saturated:
                result["saturated_rounds"] = saturated
                result["saturated"] = {
                    "connections": args.saturate,
                    "batch_images": BATCH,
                    "workers": args.workers,
                    **{
                        key: statistics.median(r[part][field] for r in saturated)
                        for key, part, field in (
                            ("ceiling_images_per_s", "ceiling", "images_per_s"),
                            ("server_requests_per_s", "server_wrk", "requests_per_s"),
                            ("server_p50_ms", "server_wrk", "p50_ms"),
                        )
                    },
                    "share_of_batched_ceiling": statistics.median(r["share_of_batched_ceiling"] for r in saturated),
                }
                per_calls = [r["server_wrk"]["images_per_call"] for r in saturated]
                if None not in per_calls:
                    result["saturated"]["images_per_call"] = statistics.median(per_calls)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        from detloop.production import predlog

        store = predlog.open_log(cfg)
        logged = {r["request_id"] for r in store.rows()}
        store.close()
        result["log"] = {"sent": len(sent), "logged": len(logged), "lost": len(sent - logged)}
        if wrk_answered:  # wrk gives no request ids: its answers against the log's rows of no Python request
            result["log"]["wrk_answered"], result["log"]["wrk_logged"] = wrk_answered, len(logged - sent)
            result["log"]["wrk_lost"] = max(0, wrk_answered - len(logged - sent))
        median = statistics.median
        result["median"] = {
            "direct_p50_ms": median(r["direct"]["p50_ms"] for r in rounds),
            "direct_p95_ms": median(r["direct"]["p95_ms"] for r in rounds),
            "direct_requests_per_s": median(r["direct"]["requests_per_s"] for r in rounds),
            "server_p50_ms": median(r["server"]["p50_ms"] for r in rounds),
            "server_p95_ms": median(r["server"]["p95_ms"] for r in rounds),
            "server_requests_per_s": median(r["server"]["requests_per_s"] for r in rounds),
            "overhead_ratio_p50": median(r["overhead_ratio_p50"] for r in rounds),
            **(
                {
                    "server_wrk_p50_ms": median(r["server_wrk"]["p50_ms"] for r in rounds),
                    "server_wrk_requests_per_s": median(r["server_wrk"]["requests_per_s"] for r in rounds),
                    "overhead_ratio_p50_wrk": median(r["overhead_ratio_p50_wrk"] for r in rounds),
                }
                if all(r["server_wrk"] for r in rounds)
                else {}
            ),
            "direct_torch_p50_ms": median(r["direct_torch"]["p50_ms"] for r in rounds),
            "direct_torch_requests_per_s": median(r["direct_torch"]["requests_per_s"] for r in rounds),
        }
        # the served runtime (the version's ONNX export on ONNX Runtime) against its PyTorch weights
        result["runtime_speedup"] = {
            "one_image_per_call": round(
                result["median"]["direct_requests_per_s"] / result["median"]["direct_torch_requests_per_s"], 2
            ),
            "batched": round(
                result["direct_batched"]["images_per_s"] / result["direct_batched_torch"]["images_per_s"], 2
            ),
        }
        result["concurrent_share_of_batched_ceiling"] = round(
            result["server_concurrent"]["requests_per_s"] / result["direct_batched"]["images_per_s"], 2
        )
        if result["server_concurrent_wrk"]:
            result["concurrent_share_of_batched_ceiling_wrk"] = round(
                result["server_concurrent_wrk"]["requests_per_s"] / result["direct_batched"]["images_per_s"], 2
            )
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    write_report(args.out, result)


if __name__ == "__main__":
    main()
