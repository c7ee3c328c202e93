"""The loop's own cost per ``dvc repro``: the non-training stages, each as DVC runs it (its own process).

Needs a project where ``make demo`` has run (``--project``, default this checkout): the registry holds the
base and the gated fine-tune, ``build/`` the stage outputs. Each round runs ``python -m detloop.<stage>``
for ``evaluate``, ``mix``, ``retrain`` (not due on the demo), ``gate`` and ``promote`` in pipeline order,
with the prediction cache emptied first and then given the base's anchor-test pass, as on a fresh ``dvc repro``
(the base stage makes that pass in its training process once the version is registered; ``evaluate`` and
the gate's reference reuse it), and the gate's passes of the demo's fine-tuned version and its reference,
which the fine-tune stage makes the same way once its version is registered. Those passes are timed on
their own (``base_anchor_pass``, ``finetune_gate_passes``: inference in the training stages, with torch and
Ultralytics already loaded there; not counted in the overhead). The gate's own inference is read from
its ``build/gate/decision.json`` (``measured.*.*.timings.inference_s`` of the passes it did not reuse),
so "gate minus inference" is the gate's wall time minus the time its prediction passes took.

``--before-src DIR`` (another checkout's ``src``, e.g. ``git worktree add /tmp/before <commit>``) runs the
same rounds with that code, alternating with this tree's, on the same project: before/after side by
side. The loop overhead is also given as a share of the demo's training time (the ``base`` and
``finetune`` runs' durations in the project's MLflow store).

    .venv/bin/python benchmarks/loop_overhead.py [--project PATH] [--rounds 3] [--before-src DIR]

The stages re-record the demo's gate decision and moves in the project's registry (the same figures);
run it on a scratch clone, not on a project whose registry matters. Results: build/benchmarks/loop_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from shared import bin_env, load_average, write_report  # noqa: E402

STAGES = ("evaluate", "mix", "retrain", "gate", "promote")
DERIVED = ("gate_inference", "gate_minus_inference", "overhead", "base_anchor_pass", "finetune_gate_passes")
OUT = ROOT / "build" / "benchmarks" / "loop_overhead.json"


def stage_env(project: Path, src: Path) -> dict:
    """The environment of a stage's process on ``project`` with the code in ``src``."""
    env = {**bin_env(), "DETLOOP_ROOT": str(project), "PYTHONPATH": str(src)}
    env.setdefault("YOLO_OFFLINE", "1")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return env


def run_stage(project: Path, src: Path, stage: str) -> float:
    env = stage_env(project, src)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", f"detloop.{stage}"], cwd=project, env=env, capture_output=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{stage} ({src}) failed with exit {done.returncode}:\n{done.stderr.decode()[-3000:]}")
    return seconds


def gate_inference(project: Path) -> tuple[float, int]:
    """Seconds the gate spent in prediction passes it did not reuse, and how many it reused."""
    record = json.loads((project / "build" / "gate" / "decision.json").read_text())
    seconds, reused = 0.0, 0
    for role in record["measured"].values():
        for result in role.values():
            timings = result.get("timings", {})
            if timings.get("predictions_cached"):
                reused += 1
            else:
                seconds += timings.get("inference_s", 0.0)
    return seconds, reused


# a training stage's process, as far as a pass it makes for the stages after it goes: torch and Ultralytics
# imported and the MLflow store set up before the clock starts; each pass below then prints its own seconds
TRAINING_PROCESS = """
import json, tempfile, time
from pathlib import Path
from detloop.core.config import compose
from detloop.model.yolo import ultralytics
from detloop.tracking import runs
cfg = compose([])
runs.setup(cfg)
ultralytics()
"""

# the base stage's last step since it keeps the new base's anchor-test pass for `evaluate`
BASE_PASS = (
    TRAINING_PROCESS
    + """
from detloop.evaluation import measure
from detloop.model.pyfunc import model_weights
target = json.loads(Path("build/base/model.json").read_text())
with tempfile.TemporaryDirectory() as tmp:
    weights, config = model_weights(target["model_uri"], Path(tmp))
    started = time.perf_counter()
    measure.predict_split(cfg, weights, int(config.get("imgsz", 640)))
    print(time.perf_counter() - started)
"""
)

# the fine-tune stage's last step since it makes the gate's passes for the version it registered
FINETUNE_PASSES = (
    TRAINING_PROCESS
    + """
from detloop.evaluation import gating
target = json.loads(Path("build/finetune/model.json").read_text())
started = time.perf_counter()
gating.predict_ahead(cfg, target["version"], Path(tempfile.gettempdir()))
print(time.perf_counter() - started)
"""
)


def training_stage_pass(project: Path, src: Path, code: str, marker: tuple[str, str]) -> float | None:
    """Seconds of a pass a training stage makes for the stages after it (None for a tree without it)."""
    if marker[1] not in (src / "detloop" / marker[0]).read_text():
        return None
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=project, env=stage_env(project, src), capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(f"a training stage's pass failed:\n{done.stderr[-3000:]}")
    return round(float(done.stdout.strip().splitlines()[-1]), 2)


def one_round(project: Path, src: Path) -> dict:
    shutil.rmtree(project / "build" / "cache", ignore_errors=True)
    row: dict = {
        "load": load_average(),
        "base_anchor_pass": training_stage_pass(
            project, src, BASE_PASS, ("evaluation/measure.py", "def predict_split")
        ),
        "finetune_gate_passes": training_stage_pass(
            project, src, FINETUNE_PASSES, ("evaluation/gating.py", "def predict_ahead")
        ),
    }
    for stage in STAGES:
        row[stage] = round(run_stage(project, src, stage), 2)
    inference, reused = gate_inference(project)
    row["gate_inference"] = round(inference, 2)
    row["gate_passes_reused"] = reused
    row["gate_minus_inference"] = round(row["gate"] - inference, 2)
    row["overhead"] = round(sum(row[s] for s in STAGES if s != "gate") + row["gate_minus_inference"], 2)
    return row


def training_seconds(project: Path) -> dict:
    """Durations of the demo's training runs (stages base and finetune) in the project's MLflow store."""
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
        "from demo_run import stage_durations\n"
        "from detloop.core.config import compose\n"
        "found = stage_durations(compose([]))\n"
        "print(json.dumps({k: v for k, v in found.items() if k in ('base', 'finetune')}))\n"
    )
    env = stage_env(project, ROOT / "src")
    done = subprocess.run([sys.executable, "-c", code], cwd=project, env=env, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {}


def summary(rows: list[dict]) -> dict:
    keys = [*STAGES, *DERIVED]
    return {
        k: {"median": statistics.median(r[k] for r in rows), "min": min(r[k] for r in rows)}
        for k in keys
        if all(r.get(k) is not None for r in rows)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=ROOT, help="a project after `make demo` (a scratch clone)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before-src", type=Path, help="another checkout's src/: timed alternately with this tree")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    project = args.project.resolve()
    if not (project / "build" / "gate" / "decision.json").is_file():
        raise SystemExit(f"{project}: no build/gate/decision.json; run `make demo` there first")
    trees = {"this tree": ROOT / "src"}
    if args.before_src:
        trees["before"] = args.before_src.resolve()
    rounds: dict[str, list[dict]] = {name: [] for name in trees}
    for i in range(args.rounds):
        for name, src in trees.items():
            row = one_round(project, src)
            rounds[name].append(row)
            print(f"round {i + 1} {name}: {json.dumps(row)}", flush=True)
    training = training_seconds(project)
    result = {
        "project": str(project),
        "cpus": os.cpu_count(),
        "training_s": training,
        "trees": {
            name: {"src": str(src), "rounds": rounds[name], "summary": summary(rounds[name])}
            for name, src in trees.items()
        },
    }
    total_training = sum(training.values())
    print(f"\n{'stage':<24}" + "".join(f"{name:>22}" for name in trees))
    for key in [*STAGES, *DERIVED]:
        figures = [result["trees"][n]["summary"].get(key) for n in trees]
        cells = "".join(f"{f['median']:>14.2f} s (min {f['min']:.1f})" if f else f"{'-':>22}" for f in figures)
        print(f"{key:<24}{cells}")
    if total_training:
        for name in trees:
            share = result["trees"][name]["summary"]["overhead"]["median"] / total_training
            result["trees"][name]["share_of_training"] = round(share, 4)
            print(f"{name}: loop overhead {share:.1%} of the demo's training ({total_training:.0f} s: {training})")
    write_report(args.out, result)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
