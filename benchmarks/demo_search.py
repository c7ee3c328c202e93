"""The recipe search on a strong shift: `dvc repro` of a fresh project on the demo's strong-shift data.

1. `git clone` this project into WORKDIR/repo (its own build/, MLflow store and DVC cache);
2. `detloop demo-data demo=strong_shift` (the demo's anchor, harsher scans of the reported layout),
   `dvc commit data.dvc`;
3. `dvc repro`: base from scratch, the guide's fine-tune, the gates, promote, and the stage `search`
   with `conf/search` as committed (mode run, 4 trials);
4. reads what a user would: the gate record of the guide's candidate, `build/search/result.json`, the
   registry's `staging` holder and its gate tags, and the wall time of each stage (from the DVC log).

    .venv/bin/python benchmarks/demo_search.py --workdir /tmp/detloop-search [--check]

`--check` exits 1 unless the guide's candidate failed Gate 2 and the staged trial passes Gate 1 and
Gate 2. Writes `build/benchmarks/demo_search.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from shared import BIN, load_average, write_report

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "build" / "benchmarks" / "demo_search.json"


def run(cmd: list[str], cwd: Path, env: dict, log: Path) -> float:
    started = time.perf_counter()
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        done = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}: exit {done.returncode} (log: {log})")
    return round(time.perf_counter() - started, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="work folder (the clone goes to WORKDIR/repo)")
    parser.add_argument("--source", type=Path, default=ROOT, help="the project to clone (default: this one)")
    parser.add_argument("--check", action="store_true", help="exit 1 when an expectation fails")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    repo = args.workdir.resolve() / "repo"
    if repo.exists():
        shutil.rmtree(repo)
    repo.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "clone", "-q", str(args.source), str(repo)], check=True)
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(repo / "src"),
        "YOLO_OFFLINE": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DVC_NO_ANALYTICS": "1",
    }
    log = args.workdir.resolve() / "demo_search.log"
    log.write_text("")
    times = {
        "demo_data": run([str(BIN / "detloop"), "demo-data", "demo=strong_shift"], repo, env, log),
        "dvc_commit": run([str(BIN / "dvc"), "commit", "-f", "-q", "data.dvc"], repo, env, log),
    }
    load_before = load_average()
    times["dvc_repro"] = run([str(BIN / "dvc"), "repro"], repo, env, log)
    result = {"load_before": load_before, "load_after": load_average(), "times_s": times}
    result.update(read_outcome(repo, env))
    failures = []
    guide, staged = result["guide"], result.get("staged")
    if not (guide["gate1"] == "pass" and guide["gate2"] != "pass"):
        failures.append(f"the guide's recipe was expected to pass Gate 1 and fail Gate 2: {guide}")
    if (
        not staged
        or staged.get("gate.regression.decision") != "pass"
        or staged.get("gate.new_samples.decision") != "pass"
    ):
        failures.append(f"the staged candidate does not pass Gate 1 and Gate 2: {staged}")
    result["failures"] = failures
    write_report(args.output, result)
    if failures and args.check:
        print("\n".join(failures), file=sys.stderr)
        return 1
    return 0


def read_outcome(repo: Path, env: dict) -> dict:
    """What `dvc repro` left: the guide's gate record, the search result, the staging holder's gate record."""
    code = """
import json, mlflow
from detloop.core.config import compose
from detloop.tracking import registry, runs
cfg = compose([])
runs.setup(cfg)
name = cfg.mlflow.registered_model
staging = registry.alias_holder(name, "staging")
out = {"staging": staging, "production": registry.alias_holder(name, "production")}
if staging:
    mv = registry.client().get_model_version(name, staging)
    run = mlflow.get_run(mv.run_id)
    out["staged"] = {"version": staging, **{k: v for k, v in run.data.tags.items() if k.startswith("gate.")},
        **{k: v for k, v in run.data.metrics.items() if k.startswith("gate.")}}
print(json.dumps(out))
"""
    done = subprocess.run([str(BIN / "python"), "-c", code], cwd=repo, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    registry_state = json.loads(done.stdout.strip().splitlines()[-1])
    record = json.loads((repo / "build" / "gate" / "decision.json").read_text())
    search = json.loads((repo / "build" / "search" / "result.json").read_text())
    figures = record["figures"]
    guide = {
        "version": record["candidate"]["version"],
        "decision": record["decision"],
        "gate1": record["gates"]["regression"]["decision"],
        "gate2": record["gates"]["new_samples"]["decision"],
        "anchor_map50": figures.get("gate.regression.candidate_map50"),
        "reference_map50": figures.get("gate.regression.reference_map50"),
        "drop": figures.get("gate.regression.drop"),
        "detection_rate": figures.get("gate.new_samples.detection_rate"),
        "reference_detection_rate": record["gates"]["new_samples"].get("reference_detection_rate"),
    }
    trials = [
        {k: t.get(k) for k in ("trial", "version", "recipe", "decision", "drop", "anchor_map50", "detection_rate")}
        for t in search.get("trials", [])
    ]
    return {
        "guide": guide,
        "search": {k: search.get(k) for k in ("mode", "due", "why", "searched", "trials_run", "passing")},
        "trials": trials,
        **registry_state,
    }


if __name__ == "__main__":
    raise SystemExit(main())
