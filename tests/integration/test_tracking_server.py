"""The base stage against a real `mlflow server` on 127.0.0.1 (not only the SQLite file store)."""

from __future__ import annotations

import mlflow
import pytest

from detloop.base import run as run_base
from detloop.core.config import compose
from detloop.tracking import registry

pytestmark = pytest.mark.integration


def test_base_stage_registers_through_a_tracking_server(server, tiny_project):
    cfg = compose([*tiny_project, f"mlflow.tracking_uri={server}"])
    result = run_base(cfg)
    assert mlflow.get_tracking_uri() == server
    assert registry.alias_holder(cfg.mlflow.registered_model, "production") == result["version"]
    model = mlflow.pyfunc.load_model(f"models:/{cfg.mlflow.registered_model}@base")
    assert model.metadata.run_id == result["run_id"]
