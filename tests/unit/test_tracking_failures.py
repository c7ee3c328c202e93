"""MLflow's refusals and a lost server, as MLflow raises them, read as detloop errors with exit codes."""

from __future__ import annotations

import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, RESOURCE_DOES_NOT_EXIST, UNAUTHENTICATED

from detloop.core import env
from detloop.core.errors import BadInput, MoveConflict, PermissionRefused, TrackingUnavailable, exit_code
from detloop.core.failures import acting, as_detloop_error, report

SERVER = "http://mlflow.example:5000"
DENIED = "API request to endpoint /api/2.0/mlflow/runs/create failed with error code 403 != 200. Response body: 'x'"


def lost_connection() -> MlflowException:
    """What MLflow's REST client raises when the server is gone: its own error raised while handling requests'."""
    try:
        try:
            raise requests.ConnectionError(
                "HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded with url: /api/2.0/mlflow/runs/"
                "search (Caused by NewConnectionError(': Failed to establish a new connection: [Errno 111] Connection "
                "refused'))"
            )
        except requests.ConnectionError as err:
            # as mlflow.utils.rest_utils.http_request does: no ``from``, the connection error is the context
            raise MlflowException(f"API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/search failed: {err}")  # noqa: B904
    except MlflowException as err:
        return err


@pytest.fixture
def server(monkeypatch):
    """MLflow pointed at a (never contacted) server, put back afterwards."""
    import mlflow

    before = mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", SERVER)
    mlflow.set_tracking_uri(SERVER)
    yield SERVER
    mlflow.set_tracking_uri(before)


def test_a_403_names_the_server_the_user_the_action_and_what_it_needs(server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "rita")
    action = acting("moving alias production of registered model m to v3", needs="EDIT on registered model m")
    with pytest.raises(PermissionRefused) as refused, action:
        raise MlflowException(DENIED, error_code=PERMISSION_DENIED)
    assert str(refused.value).startswith(
        "MLflow server http://mlflow.example:5000 refused user 'rita' (permission denied): moving alias production "
        "of registered model m to v3 needs EDIT on registered model m"
    )
    # without the action (the entry points' fallback): MLflow's endpoint
    generic = as_detloop_error(MlflowException(DENIED, error_code=PERMISSION_DENIED))
    assert isinstance(generic, PermissionRefused) and "calling /api/2.0/mlflow/runs/create" in str(generic)


def test_a_401_says_the_credentials_were_refused(server, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    found = as_detloop_error(MlflowException("401", error_code=UNAUTHENTICATED))
    assert isinstance(found, PermissionRefused) and "refused the credentials of user '(none: MLFLOW_TRACKING" in str(
        found
    )


def test_a_lost_server_is_tracking_unavailable_with_a_short_reason(server):
    with pytest.raises(TrackingUnavailable) as lost, acting("closing the audit record", after="the alias moved"):
        raise lost_connection()
    assert str(lost.value) == (
        "MLflow tracking server http://mlflow.example:5000 stopped answering while closing the audit record: "
        "Connection refused; the alias moved"
    )


def test_other_errors_stay_errors():
    assert as_detloop_error(ValueError("a bug")) is None
    assert as_detloop_error(MlflowException("no such run", error_code=RESOURCE_DOES_NOT_EXIST)) is None
    with pytest.raises(KeyError), acting("anything"):
        raise KeyError("a bug keeps its traceback")


def test_report_gives_each_error_its_exit_code_and_one_message():
    said = []
    assert report(BadInput("bad", ["a problem"]), lambda fmt, text: said.append(text)) == 2
    assert report(MoveConflict("alice is moving it"), lambda fmt, text: said.append(text)) == 2
    assert report(lost_connection(), lambda fmt, text: said.append(text)) == 3
    assert report(MlflowException(DENIED, error_code=PERMISSION_DENIED), lambda fmt, text: said.append(text)) == 3
    assert report(ValueError("a bug"), lambda fmt, text: said.append(text)) is None
    assert said[0] == "bad\n  - a problem" and said[1] == "alice is moving it" and len(said) == 4
    assert [exit_code(e) for e in (TrackingUnavailable("x"), PermissionRefused("x"), ValueError())] == [3, 3, None]


def test_detloop_bounds_mlflows_http_retries_unless_the_user_set_them(monkeypatch, tmp_path):
    for key in env.TRACKING_HTTP:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")  # the user's choice wins
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path))
    env.prepare_environment(tmp_path)
    import os

    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"
    assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "1"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "300"
