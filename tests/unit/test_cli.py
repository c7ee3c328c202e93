"""The console script as a user meets it: help, exit codes, messages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from detloop.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
DETLOOP = str(Path(sys.executable).parent / "detloop")


def test_help_lists_the_commands():
    out = subprocess.run([DETLOOP, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("demo-data", "anchor", "registry"):
        assert command in out


def test_anchor_import_of_a_missing_folder_exits_2_and_names_it(tmp_path, capsys):
    code = main(["anchor", "import", str(tmp_path / "nowhere"), f"paths.data={tmp_path / 'data'}"])
    assert code == 2
    assert "nowhere" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_a_bad_override_key_is_reported_not_a_traceback(tmp_path):
    done = subprocess.run([DETLOOP, "registry", "mlflow.no_such_key=1"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2
    assert "mlflow.no_such_key" in done.stderr and "Traceback" not in done.stderr


def test_outside_a_project_the_error_says_where_to_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DETLOOP_ROOT"}
    done = subprocess.run([DETLOOP, "registry"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.returncode == 2
    assert "DETLOOP_ROOT" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.integration
def test_registry_on_an_empty_store_says_how_to_fill_it(tmp_path, capsys):
    assert main(["registry", f"mlflow.store_dir={tmp_path / 'mlruns'}", "mlflow.tracking_uri=null"]) == 0
    assert "no versions" in capsys.readouterr().out
