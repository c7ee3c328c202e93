"""`dvc repro` sees the clock and the monitor's flag through stage `trigger` (real DVC, no training).

A small DVC project in a temp folder: the project's own `trigger` stage, verbatim from dvc.yaml and
run as `python -m detloop.trigger`, followed by two stub stages in the places of `mix` and
`finetune` that append their name to runs.log. The drill clock is `DETLOOP_NOW` (`trigger.now`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
WEDNESDAY = "2025-03-05T12:00:00Z"  # weekly periods start on Mondays (trigger.schedule.origin)
SUNDAY = "2025-03-09T23:59:59Z"  # the same period
MONDAY = "2025-03-10T00:00:01Z"  # the next period


def stub(name: str, dep: str) -> dict:
    """A stage in the place of ``name``: copies its input forward and appends its name to runs.log."""
    out = f"build/{name}/seen.json"
    return {
        "cmd": f"mkdir -p build/{name} && cp {dep} {out} && echo {name} >> runs.log",
        "deps": [dep],
        "outs": [{out: {"cache": False}}],
    }


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """conf/ with schedule and performance on, the real trigger stage and the stubs, `dvc init --no-scm`."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    trigger = stages["trigger"]
    assert trigger["always_changed"] is True
    assert "build/trigger/state.json" in stages["mix"]["deps"]  # the real mix reads what the stub reads
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "conf", repo / "conf")
    for dep in trigger["deps"]:  # DVC hashes them; the installed detloop package runs
        (repo / dep).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / dep, repo / dep)
    conf = repo / "conf" / "trigger" / "default.yaml"
    text = conf.read_text()
    assert "strategies: [volume, performance]" in text
    conf.write_text(text.replace("strategies: [volume, performance]", "strategies: [volume, schedule, performance]"))
    pipeline = {
        "stages": {
            "trigger": trigger,
            "mix": stub("mix", "build/trigger/state.json"),
            "finetune": stub("finetune", "build/mix/seen.json"),
        }
    }
    (repo / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    dvc(repo, WEDNESDAY, "init", "--no-scm", "-q")
    return repo


def dvc(repo: Path, now: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in {"DETLOOP_ROOT", "DETLOOP_NOW"}}
    env.update({"PATH": f"{BIN}{os.pathsep}{env['PATH']}", "DETLOOP_NOW": now})
    done = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"dvc {' '.join(args)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def repro(repo: Path, now: str) -> list[str]:
    """`dvc repro` at ``now``; returns the stages that ran after the trigger (from runs.log)."""
    log = repo / "runs.log"
    before = log.read_text().split() if log.is_file() else []
    out = dvc(repo, now, "repro")
    assert "Running stage 'trigger'" in out  # always_changed: it looks at the clock and the flag every time
    return (log.read_text().split() if log.is_file() else [])[len(before) :]


def raise_flag(repo: Path, reason: str, raised_at: str) -> Path:
    flag = repo / "build" / "trigger" / "performance.json"  # trigger.performance_flag
    flag.write_text(json.dumps({"reason": reason, "raised_by": "detloop monitor", "raised_at": raised_at}))
    return flag


def test_dvc_repro_reruns_mix_on_a_new_flag_or_period_and_only_then(project):
    # given the pipeline reproduced once on a Wednesday
    assert repro(project, WEDNESDAY) == ["mix", "finetune"]
    # when nothing changed, or only the time within the same weekly period, then mix does not rerun
    assert repro(project, WEDNESDAY) == []
    assert repro(project, SUNDAY) == []
    # when the monitor raises its flag, then mix and the stage after it rerun, once
    flag = raise_flag(project, "title detection rate 0.62 < 0.90", "2025-03-09T20:00:00Z")
    assert repro(project, SUNDAY) == ["mix", "finetune"]
    assert repro(project, SUNDAY) == []
    # when the fine-tune answers the flag (stage finetune renames it), then nothing reruns
    flag.rename(flag.with_name("performance.consumed-v2.json"))
    assert repro(project, SUNDAY) == []
    # when the clock passes the Monday boundary, then mix and the stage after it rerun, once
    assert repro(project, MONDAY) == ["mix", "finetune"]
    assert repro(project, MONDAY) == []
    state = json.loads((project / "build" / "trigger" / "state.json").read_text())
    assert state["schedule"] == {"period": 2879, "starts": "2025-03-10T00:00:00Z"}
    assert state["performance"]["flags"] == 1
