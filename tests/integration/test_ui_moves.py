"""Moving ``production`` in the MLflow UI itself (clicks in headless Chromium) against a real ``mlflow server``.

A real tracking server (SQLite backend, webhooks allowed to this machine), real registered detectors
served by a real ``detloop serve``, and the alias editor of the MLflow UI driven by
tests/mlflow_ui_driver.py. Once to a passing version and once to a rejected one, under both
policies: ``enforce`` sees the moves through MLflow's signed registry webhooks (serve polls only
every 120 s, so the webhook alone must make it act), ``record`` through serve's polling.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from tests.conftest import mlflow_server, tiny_overrides, wait_healthy
from tests.mlflow_ui_driver import set_alias_in_ui
from tests.serving_helpers import anchor_classes, detector_weights, register_detector

from detloop.cli.main import main
from detloop.core.config import compose
from detloop.core.env import free_port
from detloop.tracking import registry

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DETLOOP = str(Path(sys.executable).parent / "detloop")
SECRET = "ui-moves-test-secret"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_data):
    """A tracking server that may deliver webhooks to this machine, and a tiny project's data."""
    base = tmp_path_factory.mktemp("ui-moves")
    shutil.copytree(tiny_data, base / "data")
    webhooks = {
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",  # the receiver (detloop serve) is on 127.0.0.1
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        "MLFLOW_WEBHOOK_CACHE_TTL": "1",  # the server caches its webhook list (60 s by default)
    }
    with mlflow_server(base / "server.db", base / "artifacts", base / "server.log", env=webhooks) as uri:
        names = anchor_classes(base / "data")
        weights = {hot: detector_weights(base / f"hot{hot}.pt", names, hot_class=hot) for hot in (0, 1)}
        yield {"uri": uri, "base": base, "weights": weights}


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.loads(answer.read())


def served(serve_url: str) -> str:
    return str(get(f"{serve_url}/version")["model_version"])


def wait_for(check, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


def detloop(capsys, *args: str) -> tuple[int, str]:
    """``detloop ARGS`` in this process (as the console script runs it): exit code and stdout."""
    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().out


@pytest.mark.parametrize("policy", ["enforce", "record"])
def test_production_moved_in_the_mlflow_ui(stack, policy, tmp_path, capsys, monkeypatch):
    uri, base = stack["uri"], stack["base"]
    name = f"ui-moves-{policy}"
    overrides = [
        *tiny_overrides(base),
        f"mlflow.tracking_uri={uri}",
        f"mlflow.registered_model={name}",
        f"paths.build={tmp_path / 'build'}",
        f"promote.ui_moves.policy={policy}",
        f"serve.poll_seconds={120 if policy == 'enforce' else 0.5}",
        "monitor.mlflow.log=false",
    ]
    cfg = compose(overrides)
    v1 = register_detector(cfg, stack["weights"][0], tags={"decision": "bootstrap", "gate.decision": None})
    v2 = register_detector(cfg, stack["weights"][1], tags={"kind": "finetune", "base_version": v1})
    v3 = register_detector(
        cfg,
        stack["weights"][0],
        tags={"kind": "finetune", "base_version": v1, "decision": "reject", "gate.decision": "reject"},
    )
    registry.move_alias(cfg, "base", v1, why="test: the base", decision="base")
    registry.move_alias(cfg, "production", v1, why="test: bootstrap", decision="bootstrap")

    env = {**os.environ, "DETLOOP_WEBHOOK_SECRET": SECRET}
    port = free_port()
    log_path = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [DETLOOP, "serve", "--port", str(port), *overrides],
        stdout=subprocess.DEVNULL,
        stderr=log_path.open("w"),
        env=env,
    )
    serve_url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(serve_url, proc, "detloop serve", timeout=180, log=log_path)
        assert served(serve_url) == v1
        if policy == "enforce":
            monkeypatch.setenv("DETLOOP_WEBHOOK_SECRET", SECRET)
            assert detloop(capsys, "registry", "--add-webhook", f"{serve_url}/registry-webhook", *overrides)[0] == 0
            time.sleep(1.5)  # the server's webhook cache (MLFLOW_WEBHOOK_CACHE_TTL=1) sees it
        shots = tmp_path / "shots"

        # 1. a person gives production to the passing v2 in the UI: kept, recorded, served
        set_alias_in_ui(uri, name, v2, "production", screenshot_dir=shots / "v2")
        wait_for(lambda: served(serve_url) == v2, f"serve swaps to v{v2}")
        external = [m for m in registry.history(cfg) if m["external"]]
        assert [(m["from_version"], m["to_version"], m["allowed"]) for m in external] == [(v1, v2, True)]

        # 2. then to the rejected v3
        set_alias_in_ui(uri, name, v3, "production", screenshot_dir=shots / "v3")
        moves = wait_for(
            lambda: [m for m in registry.history(cfg) if m["alias"] == "production" and m["to_version"] == v3],
            "the move to v3 is recorded",
        )
        assert moves[-1]["external"] and not moves[-1]["allowed"] and moves[-1]["gate_status"] == "reject"
        if policy == "enforce":
            wait_for(lambda: registry.alias_holder(name, "production") == v2, "production is put back on v2")
            time.sleep(2)
            assert served(serve_url) == v2, "serve never swaps to the refused version"
            history = [(m["from_version"], m["to_version"], m["decision"]) for m in registry.history(cfg)]
            assert history[-2:] == [(v2, v3, "external"), (v3, v2, "revert")]
            runs = registry.client().search_runs(
                [registry.audit_experiment_id(cfg)], "tags.`audit.seen_by` = 'webhook'", max_results=10
            )
            assert len(runs) == 2, "both UI moves were seen through the signed webhook"
            back_to = v1
        else:
            wait_for(lambda: served(serve_url) == v3, "serve swaps to v3 (policy record keeps the move)")
            table = detloop(capsys, "registry", *overrides)[1]
            assert f"WARNING: v{v3}: holds production through a move made outside detloop" in table
            assert "WARNING: serving v" in log_path.read_text()
            back_to = v2
        listed = detloop(capsys, "registry", "--history", *overrides)[1]
        assert f"v{v1} -> v{v2}  by unknown" in listed and f"v{v2} -> v{v3}" in listed

        # 3. rollback works after the UI moves
        assert detloop(capsys, "rollback", "--reviewer", "ops", "--reason", "after the UI moves", *overrides)[0] == 0
        assert registry.alias_holder(name, "production") == back_to
        wait_for(lambda: served(serve_url) == back_to, f"serve swaps back to v{back_to}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
