"""The gates and rollback on the demo, as a user would drive them after `make demo`.

1. A deliberately bad candidate: a fine-tune forced past the trigger with 1x replay, lr0 0.05, the
   backbone unfrozen and Ultralytics' default warmup_bias_lr 0.1 (every rule of the document broken
   at once), built in `build/bad/` so the pipeline's own outputs stay untouched.
2. `python -m detloop.gate` and `python -m detloop.promote` on it: Gate 1 must reject it and production
   must not move.
3. `detloop rollback`: production goes back to the previous version, and
   `mlflow.pyfunc.load_model("models:/detloop-detector@production")` then predicts with it.
4. `detloop promote` gives production back to the version that held it (its gate record passed).

    .venv/bin/python benchmarks/demo_gates.py [--check]

Writes `build/benchmarks/demo_gates.json`; `--check` exits 1 when an expectation fails (CI runs it
after `make demo`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
from shared import BIN, bin_env, drill_finish, drill_start

from detloop.core.config import resolve_path
from detloop.tracking import registry

BAD = "build/bad"
BAD_RECIPE = [
    "trigger.force=true",
    "mix.ratios={10:1,50:1,200:1,500:1}",
    "finetune.train.lr0=0.05",
    "finetune.train.freeze=0",
    "finetune.train.warmup_bias_lr=0.1",
    "finetune.train.plots=false",
]


def step(name: str, cmd: list[str], timings: dict, expect: int = 0) -> str:
    start = time.perf_counter()
    done = subprocess.run(cmd, env=bin_env(), capture_output=True, text=True)
    timings[name] = round(time.perf_counter() - start, 1)
    if done.returncode != expect:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit(f"{name}: exit {done.returncode}, expected {expect}: {' '.join(cmd)}")
    return done.stdout


def main() -> int:
    args, cfg, before = drill_start(__doc__)
    name = cfg.mlflow.registered_model
    py, detloop = str(BIN / "python"), str(BIN / "detloop")
    timings: dict[str, float] = {}
    bad = [f"paths.build={BAD}"]
    step("bad candidate: mix", [py, "-m", "detloop.mix", *bad, *BAD_RECIPE], timings)
    step("bad candidate: finetune", [py, "-m", "detloop.finetune", *bad, *BAD_RECIPE], timings)
    step("gate", [py, "-m", "detloop.gate", *bad], timings)
    step("promote stage", [py, "-m", "detloop.promote", *bad], timings)
    record = json.loads((Path(BAD) / "gate" / "decision.json").read_text())
    after_promote = registry.alias_holder(name, "production")
    step("detloop rollback", [detloop, "rollback", "--reviewer", "demo", "--reason", "rollback drill"], timings)
    rolled_to = registry.alias_holder(name, "production")
    start = time.perf_counter()
    model = mlflow.pyfunc.load_model(f"models:/{name}@production")
    images = sorted((resolve_path(cfg, "anchor") / "images" / "test").iterdir())[:4]
    predictions = model.predict(pd.DataFrame({"image": [str(p) for p in images]}))
    timings["pyfunc load + predict (4 images)"] = round(time.perf_counter() - start, 1)
    served_run = model.metadata.run_id
    expected_run = registry.client().get_model_version(name, rolled_to).run_id
    step("detloop promote", [detloop, "promote", before, "--reviewer", "demo", "--reason", "drill over"], timings)
    restored = registry.alias_holder(name, "production")
    gates = record["gates"]
    result = {
        "production_before": before,
        "bad_candidate": record["candidate"]["version"],
        "bad_decision": record["decision"],
        "gate_1": {k: gates["regression"][k] for k in ("decision", "reference_map50", "candidate_map50", "drop")},
        "gate_2": {k: gates["new_samples"].get(k) for k in ("decision", "detection_rate", "reference_detection_rate")},
        "production_after_promote_stage": after_promote,
        "production_after_rollback": rolled_to,
        "pyfunc_served_run_id": served_run,
        "pyfunc_expected_run_id": expected_run,
        "pyfunc_predictions": len(predictions),
        "pyfunc_classes": sorted(set(predictions["class_name"])) if len(predictions) else [],
        "production_after_promote": restored,
        "seconds": timings,
    }
    failures = [
        *(["the bad candidate was not rejected by Gate 1"] if gates["regression"]["decision"] != "reject" else []),
        *(["production moved after the promote stage"] if after_promote != before else []),
        *(["rollback did not move production"] if rolled_to == before else []),
        *(["@production does not load the rolled-back-to version"] if served_run != expected_run else []),
        *(["the restored production model predicted nothing"] if not len(predictions) else []),
        *([f"production is v{restored}, not v{before}, after `detloop promote`"] if restored != before else []),
    ]
    return drill_finish(cfg, "demo_gates", result, failures, args.check)


if __name__ == "__main__":
    sys.exit(main())
