"""What is committed for DVC matches what the code produces: data.dvc and dvc.lock."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DATA_PATHS = ("data", "build/")


def dvc(cwd: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("DETLOOP_ROOT", None)
    done = subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def copy_tracked(dest: Path) -> Path:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def test_committed_dvc_lock_records_the_current_code_and_params(tmp_path):
    # given a copy of the project without data or build outputs (as on a fresh clone)
    repo = copy_tracked(tmp_path / "repo")
    # when DVC compares dvc.lock with the workspace
    status = json.loads(dvc(repo, "status", "--json") or "{}")
    # then the only differences are the absent data and outputs: no code or params changed
    stale = []
    for stage, changes in status.items():
        for change in changes:
            if change == "always changed":  # stage trigger reads the clock and the monitor's flag on every repro
                continue
            if not isinstance(change, dict):
                stale.append(f"{stage}: {change}")
                continue
            for kind, paths in change.items():
                if kind == "changed outs" or not isinstance(paths, dict):
                    continue
                stale += [
                    f"{stage}: {kind} {p} {s}"
                    for p, s in paths.items()
                    if not (s == "deleted" and p.startswith(DATA_PATHS))
                ]
    assert not stale, "dvc.lock is stale; run `dvc repro` (or `dvc commit`) and commit dvc.lock:\n" + "\n".join(stale)


def test_demo_data_regenerates_exactly_what_data_dvc_records(tmp_path):
    # given a copy of the project (data.dvc committed, no data/)
    repo = copy_tracked(tmp_path / "repo")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("DETLOOP_ROOT", None)
    # when the demo data is written with the default config
    subprocess.run([str(BIN / "detloop"), "demo-data"], cwd=repo, env=env, check=True, capture_output=True)
    # then DVC finds the workspace data identical to data.dvc (only the local cache lacks it)
    status = json.loads(dvc(repo, "status", "--json", "data.dvc") or "{}")
    changes = status.get("data.dvc", [])
    assert changes in ([], [{"changed outs": {"data": "not in cache"}}]), changes
    dvc(repo, "commit", "-f", "data.dvc")
    assert (repo / "data.dvc").read_text() == (ROOT / "data.dvc").read_text()
