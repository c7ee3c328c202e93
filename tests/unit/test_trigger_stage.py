"""Stage ``trigger``: writes the trigger state for DVC, and stays cheap (it runs on every `dvc repro`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import tiny_overrides

from detloop import trigger
from detloop.core.config import compose
from detloop.data import pool

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("mlflow", "ultralytics", "torch", "fiftyone", "cv2")


def test_the_stage_writes_the_trigger_state(tmp_path):
    # given schedule and performance on, and a drill clock
    cfg = compose([*tiny_overrides(tmp_path), "trigger.strategies=[schedule,performance]", "trigger.now=2025-03-05"])
    # when the stage runs
    state = trigger.run(cfg)
    # then build/trigger/state.json holds the period and the flag hash, and nothing else
    written = json.loads((tmp_path / "build" / "trigger" / "state.json").read_text())
    assert written == state == pool.trigger_state(cfg)
    assert state == {
        "schedule": {"period": 2878, "starts": "2025-03-03T00:00:00Z"},
        "performance": {"flags": 0, "sha256": None},
    }


def test_the_stage_imports_neither_mlflow_nor_ultralytics(tmp_path):
    # when the stage runs as DVC starts it, with Python's import timing on
    env = {**os.environ, "DETLOOP_ROOT": str(ROOT)}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "detloop.trigger", *tiny_overrides(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    # then it succeeds quickly without loading a heavy library
    assert done.returncode == 0, done.stderr[-3000:]
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in done.stderr.splitlines() if "|" in line}
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
    assert (tmp_path / "build" / "trigger" / "state.json").is_file()
    assert seconds < 20, seconds  # about a second; generous for a loaded CI machine


def test_a_bad_trigger_config_exits_2_naming_the_key(tmp_path):
    env = {**os.environ, "DETLOOP_ROOT": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "detloop.trigger", *tiny_overrides(tmp_path), "trigger.strategies=[volume,weekly]"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    problem = "trigger.strategies: unknown strategy 'weekly' (one of volume, schedule, performance)"
    assert problem in done.stdout + done.stderr  # Hydra's logging goes to stdout
