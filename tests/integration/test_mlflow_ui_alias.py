"""A person moving or removing an alias in the MLflow UI: real clicks and typing in headless Chromium.

The session's real ``mlflow server`` (tests/integration/conftest.py) over SQLite, versions registered
through the API (``register_version``), and the aliases changed with tests/mlflow_ui_driver.py, the
helper the tests of outside moves use. Each step's screenshot is kept under the test's tmp folder
(printed) to look at.
"""

from __future__ import annotations

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from tests.conftest import register_version, tiny_overrides
from tests.mlflow_ui_driver import UIDriverError, remove_alias_in_ui, set_alias_in_ui

from detloop.core.config import compose
from detloop.tracking import runs

pytestmark = pytest.mark.integration


@pytest.fixture
def server_cfg(server, tmp_path):
    """Config for the real server and a registered model of this test's own; the tracking URI is put back after."""
    before = mlflow.get_tracking_uri()
    overrides = [*tiny_overrides(tmp_path), f"mlflow.tracking_uri={server}"]
    cfg = compose([*overrides, f"mlflow.registered_model=detector-{tmp_path.name}"])
    runs.setup(cfg)
    yield cfg
    mlflow.set_tracking_uri(before)


def aliases(client: mlflow.MlflowClient, name: str, *versions: str) -> dict[str, list[str]]:
    return {v: sorted(client.get_model_version(name, v).aliases) for v in versions}


def test_moving_production_in_the_ui_takes_it_from_the_old_version(server, server_cfg, tmp_path):
    # given two versions, production on v1 (set through the API)
    client = mlflow.MlflowClient()
    name = server_cfg.mlflow.registered_model
    v1, v2 = register_version(server_cfg), register_version(server_cfg)
    client.set_registered_model_alias(name, "production", v1)
    # when a person gives v2 the production alias in the UI
    shots = tmp_path / "move"
    print(f"screenshots: {shots}")
    notices = set_alias_in_ui(server, name, v2, "production", screenshot_dir=shots)
    # then the editor warned that it takes production from v1, and the registry moved it
    assert any(f"used on version {v1}" in n and f"remove it from version {v1}" in n for n in notices), notices
    assert client.get_model_version_by_alias(name, "production").version == v2
    assert aliases(client, name, v1, v2) == {v1: [], v2: ["production"]}
    steps = ["01-page.png", "02-editor.png", "03-typed.png", "04-saved.png"]
    assert sorted(png.name for png in shots.glob("*.png")) == steps


def test_removing_production_in_the_ui_leaves_no_holder_and_keeps_other_aliases(server, server_cfg, tmp_path):
    # given v1 holding production and base
    client = mlflow.MlflowClient()
    name = server_cfg.mlflow.registered_model
    v1 = register_version(server_cfg)
    client.set_registered_model_alias(name, "production", v1)
    client.set_registered_model_alias(name, "base", v1)
    # when a person takes production off v1 in the UI (the x on its tag)
    shots = tmp_path / "remove"
    print(f"screenshots: {shots}")
    remove_alias_in_ui(server, name, v1, "production", screenshot_dir=shots)
    # then no version holds production and v1 keeps base
    with pytest.raises(MlflowException):
        client.get_model_version_by_alias(name, "production")
    assert aliases(client, name, v1) == {v1: ["base"]}


def test_the_driver_fails_with_a_screenshot_when_there_is_nothing_to_change(server, server_cfg, tmp_path):
    client = mlflow.MlflowClient()
    name = server_cfg.mlflow.registered_model
    v1 = register_version(server_cfg)
    client.set_registered_model_alias(name, "production", v1)
    with pytest.raises(UIDriverError, match=r"already holds the alias 'production'") as err:
        set_alias_in_ui(server, name, v1, "production", screenshot_dir=tmp_path / "noop", timeout=10)
    assert "screenshot: " in str(err.value) and list((tmp_path / "noop").glob("failure-*.png"))
    with pytest.raises(ValueError, match="lower-case"):
        set_alias_in_ui(server, name, v1, "Production")
    assert client.get_model_version_by_alias(name, "production").version == v1
