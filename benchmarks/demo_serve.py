"""The production side on the demo's production model, as a user would drive it after `make demo`.

1. `detloop serve` on `models:/detloop-detector@production` (a free loopback port); `/health` names
   the production version.
2. The 120 anchor-test pages are scored over HTTP (`dataframe_split`, one page per request); every
   answer is 200 and carries that version; a non-image body gets a 4xx and the server keeps serving.
3. A failure report (`POST /report`) of a page the project has never seen lands in the inbox with the
   production model's boxes as proposed labels.
4. `detloop rollback`: the server picks up the previous version without a restart and answers 20 pages;
   `detloop promote` gives production back.
5. `detloop monitor` over the log it wrote, on the production version: each served page is an anchor-test
   page, expected to show the fields its labels show (`monitor.detection_rate.expected.labelled`), so the
   per-field detection rates must equal the drill's own count from the answers and the labels, and the
   only per-field alerts are fields the model really finds on fewer than 90 % of the pages that show
   them; confidence and latency are compared with production's own baseline and with the rolled-back
   version's (found in the registry audit trail); the MLflow run holds monitor.png. The server is
   stopped and every request is in the log.

Data and build outputs go to a copy under `build/drill/` (the project's `data/` and `data.dvc` stay
untouched); the registry is the project's own (the rollback and re-promotion are in its audit trail).

    .venv/bin/python benchmarks/demo_serve.py [--check]

Writes `build/benchmarks/demo_serve.json`; `--check` exits 1 when an expectation fails (CI runs it
after `make demo`).
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import requests
from PIL import Image, ImageOps
from shared import BIN, bin_env, drill_finish, drill_start, start_serve

from detloop.core.config import compose, resolve_path
from detloop.data.manifest import read_manifest
from detloop.production import expected_fields, predlog
from detloop.tracking import registry

DRILL = "build/drill"
ROLLBACK_PAGES = 20  # pages the rolled-back version answers: its baseline as the previous production version


def wait_for(url: str, proc: subprocess.Popen, version: str, timeout: float) -> dict:
    """``/health`` once it names ``version`` (the server swapped the model in)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"detloop serve exited with {proc.returncode}; see {DRILL}/serve.log")
        try:
            health = requests.get(f"{url}/health", timeout=5).json()
            if health.get("version") == version:
                return health
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url}/health did not name v{version} within {timeout:.0f} s")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "detloop"), *args], env=bin_env(), capture_output=True, text=True)


def unseen_page(path: Path) -> bytes:
    """A page the project has never seen: an anchor-test page mirrored (new content, same kind of document)."""
    buffer = io.BytesIO()
    ImageOps.mirror(Image.open(path).convert("RGB")).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def label_fields(cfg) -> dict[str, set[str]]:
    """Anchor-test image file name -> the fields its labels show (the drill's own ground truth)."""
    names, _ = expected_fields.anchor_names(cfg)
    anchor = resolve_path(cfg, "anchor")
    out = {}
    for row in read_manifest(anchor / "manifest.jsonl"):
        if row.get("split") == "test":
            path = expected_fields.label_file(anchor, row)
            lines = path.read_text().splitlines() if path is not None else []
            out[f"{row['id']}.jpg"] = {names[int(line.split()[0])] for line in lines if line.strip()}
    return out


def field_rates(truth: dict[str, set[str]], answers: list[tuple[str, set[str]]]) -> dict[str, list[int]]:
    """Field -> [images expected to show it, images it was detected in], over the answered pages."""
    counts: dict[str, list[int]] = {}
    for name, found in answers:
        for field in truth[name]:
            pair = counts.setdefault(field, [0, 0])
            pair[0] += 1
            pair[1] += field in found
    return counts


def check_monitor(cfg, outcome: dict, truth: dict, answers: list, previous: str, failures: list[str]) -> dict:
    """The monitor's per-field figures against the drill's own count, its alerts, baselines and plot."""
    own = field_rates(truth, answers)
    floor = float(cfg.monitor.detection_rate.alert_below)
    measured = {k: [outcome["expected_images"][k], outcome["detected_images"][k]] for k in own}
    if measured != own or outcome["expectation_sources"]["unlisted"]:
        failures.append(f"monitor per-field counts {measured} differ from the drill's {own} (or unlisted pages)")
    alerted = {a["metric"].split("/", 1)[1] for a in outcome["alerts"] if a["kind"] == "detection_rate"}
    real = {k for k, (n, hit) in own.items() if n and hit / n < floor}
    if alerted != real:
        failures.append(f"per-field alerts on {sorted(alerted)}, the answers miss {sorted(real)} (< {floor:.0%})")
    if outcome["baselines"]["previous"]["version"] != previous:
        failures.append(f"the previous production version is {outcome['baselines']['previous']} not v{previous}")
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(outcome["mlflow_run_id"])}
    if "monitor.png" not in artifacts:
        failures.append(f"monitor run {outcome['mlflow_run_id']} has no monitor.png: {sorted(artifacts)}")
    return {
        "detection_rate": {k: round(v, 4) for k, v in outcome["detection_rate"].items() if v is not None},
        "expected_images": outcome["expected_images"],
        "real_field_misses": sorted(real),
        "comparisons": {
            f"{c['rule']} vs {c['baseline']} (v{c['baseline_version']})": f"{c['figure']:.3f} of {c['limit']:g}"
            + (" ALERT" if c["alert"] else "")
            for c in outcome["comparisons"]
        },
        "alerts": [a["message"] for a in outcome["alerts"]],
        "skipped": outcome["skipped"],
        "plot": "monitor.png" in artifacts,
        "mlflow_run_id": outcome["mlflow_run_id"],
    }


def main() -> int:  # noqa: PLR0915  (one drill, step by step)
    args, cfg, production = drill_start(__doc__)
    name = cfg.mlflow.registered_model
    drill = resolve_path(cfg, "build") / "drill"
    shutil.rmtree(drill, ignore_errors=True)
    shutil.copytree(resolve_path(cfg, "data"), drill / "data")
    overrides = [f"paths.data={DRILL}/data", f"paths.build={DRILL}", "serve.poll_seconds=1"]
    drill_cfg = compose(overrides)
    failures: list[str] = []
    result: dict = {"production": production}
    start = time.perf_counter()
    proc, url = start_serve(overrides, drill / "serve.log", timeout=180)
    try:
        result["start_s"] = round(time.perf_counter() - start, 1)
        health = requests.get(f"{url}/health", timeout=10).json()
        if health.get("version") != production:
            failures.append(f"/health names v{health.get('version')}, production is v{production}")
        pages = sorted((resolve_path(cfg, "anchor") / "images" / "test").glob("*.jpg"))
        latencies, versions, boxes, answers = [], set(), 0, []
        for page in pages:
            encoded = base64.b64encode(page.read_bytes()).decode()
            payload = {"dataframe_split": {"columns": ["image"], "data": [[encoded]]}}
            sent = time.perf_counter()
            answer = requests.post(f"{url}/invocations", json=payload, timeout=60)
            latencies.append((time.perf_counter() - sent) * 1000)
            if answer.status_code != 200:
                failures.append(f"{page.name}: HTTP {answer.status_code} {answer.text[:200]}")
                continue
            versions.add(answer.json()["model_version"])
            boxes += len(answer.json()["predictions"])
            answers.append((page.name, {p["class_name"] for p in answer.json()["predictions"]}))
        result["scored"] = {
            "pages": len(pages),
            "detections": boxes,
            "versions": sorted(versions),
            "p50_ms": round(statistics.median(latencies), 1),
            "p95_ms": round(statistics.quantiles(latencies, n=20)[18], 1),
        }
        if versions != {production} or boxes == 0:
            failures.append(f"answers came from versions {sorted(versions)} with {boxes} boxes")
        bad = requests.post(
            f"{url}/invocations", data=b"not an image", headers={"Content-Type": "image/jpeg"}, timeout=30
        )
        result["bad_input"] = {"status": bad.status_code, "error": bad.json().get("error", "")[:200]}
        if not 400 <= bad.status_code < 500 or requests.get(f"{url}/health", timeout=10).status_code != 200:
            failures.append(f"a non-image body got HTTP {bad.status_code} or the server stopped answering")
        # a user reports a failure
        report = requests.post(
            f"{url}/report?note=title+missed",
            data=unseen_page(pages[0]),
            headers={"Content-Type": "image/jpeg"},
            timeout=60,
        )
        inbox = {r["id"]: r for r in read_manifest(resolve_path(drill_cfg, "inbox") / "manifest.jsonl")}
        reported = report.json().get("id") if report.status_code == 201 else None
        result["report"] = {
            "status": report.status_code,
            "id": reported,
            "proposed_labels": report.json().get("proposed_labels"),
        }
        if reported not in inbox or inbox[reported].get("note") != "title missed":
            failures.append(f"the report (HTTP {report.status_code}) is not in the inbox: {report.text[:200]}")
        # a rollback is served without a restart, then production is given back
        done = cli("rollback", "--reviewer", "drill", "--reason", "serving drill")
        previous = registry.alias_holder(name, "production")
        swapped = time.perf_counter()
        wait_for(url, proc, previous, 120)
        result["rollback"] = {"to": previous, "served_after_s": round(time.perf_counter() - swapped, 1)}
        served_by = set()
        for page in pages[1 : 1 + ROLLBACK_PAGES]:
            served = requests.post(
                f"{url}/invocations", data=page.read_bytes(), headers={"Content-Type": "image/jpeg"}, timeout=60
            ).json()
            served_by.add(served.get("model_version"))
            answers.append((page.name, {p["class_name"] for p in served.get("predictions", [])}))
        if done.returncode != 0 or previous == production or served_by != {previous}:
            failures.append(f"rollback (exit {done.returncode}) to v{previous} was not served: {sorted(served_by)}")
        done = cli("promote", production, "--reviewer", "drill", "--reason", "serving drill over")
        wait_for(url, proc, production, 120)
        if done.returncode != 0:
            failures.append(f"detloop promote {production} failed: {done.stderr[-500:]}")
        # the monitor over what was served, on production (nothing was scored after it came back); exit 0: no
        # alert, 1: alerts (each checked against the drill's own count); anything else is a failure
        watched = [f"monitor.baseline.version={production}", f"monitor.baseline.min_images={ROLLBACK_PAGES}"]
        monitor = cli("monitor", "--window-days", "1", "--json", *overrides, *watched)
        result["monitor"] = {"exit": monitor.returncode}
        if monitor.returncode not in (0, 1):
            failures.append(f"detloop monitor exited {monitor.returncode}: {monitor.stderr[-500:]}")
        else:
            outcome = json.loads(monitor.stdout)
            truth = label_fields(cfg)
            result["monitor"].update(check_monitor(drill_cfg, outcome, truth, answers, previous, failures))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    store = predlog.open_log(drill_cfg)
    result["logged_rows"] = store.count()
    store.close()
    expected = len(pages) + 2 + ROLLBACK_PAGES  # the scored pages, the bad body, the report, the rollback pages
    if result["logged_rows"] < expected:
        failures.append(f"the prediction log holds {result['logged_rows']} rows, expected at least {expected}")
    return drill_finish(cfg, "demo_serve", result, failures, args.check)


if __name__ == "__main__":
    sys.exit(main())
