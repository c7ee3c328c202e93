"""Shared fixtures: a tiny demo project (data, build, MLflow store) in a temp folder."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DETLOOP_ROOT", str(ROOT))
os.environ.setdefault("FIFTYONE_SHOW_PROGRESS_BARS", "false")

import detloop  # noqa: E402,F401  (offline environment before anything imports Ultralytics)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def tiny_overrides(base: Path) -> list[str]:
    """Overrides that put data, build outputs and the MLflow store of a tiny run under ``base``."""
    return [
        "experiment=tiny",
        f"paths.data={base / 'data'}",
        f"paths.build={base / 'build'}",
        f"mlflow.store_dir={base / 'mlruns'}",
        "mlflow.tracking_uri=null",
    ]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """The demo data set at tiny size, written once per session (read-only for tests)."""
    from detloop.core.config import compose
    from detloop.data.demo import write_demo_data

    base = tmp_path_factory.mktemp("tiny-data")
    write_demo_data(compose(tiny_overrides(base)))
    return base / "data"


@pytest.fixture
def tiny_project(tmp_path, tiny_data) -> list[str]:
    """Overrides for a fresh build folder and MLflow store that read the shared tiny data."""
    overrides = tiny_overrides(tmp_path)
    overrides[1] = f"paths.data={tiny_data}"
    return overrides


# --------------------------------------------------------------------------- a registry without training


@pytest.fixture(scope="session")
def registry_store(tmp_path_factory):
    """One initialised MLflow SQLite store for registry tests (creating one takes seconds).

    Tests share it and stay apart by using a registered model name of their own. It lives in
    /dev/shm when there is one: every registry write is a SQLite commit, three times faster in memory.
    """
    import shutil
    import tempfile

    import mlflow

    shm = Path("/dev/shm")
    store = Path(tempfile.mkdtemp(prefix="detloop-registry-", dir=shm)) if shm.is_dir() else None
    store = store or tmp_path_factory.mktemp("registry-store")
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}").search_experiments()
    yield store
    shutil.rmtree(store, ignore_errors=True)


@pytest.fixture
def registry_overrides(tmp_path, registry_store) -> list[str]:
    """Overrides for the shared registry store, a model name of this test's own and a build folder in tmp_path."""
    overrides = [o for o in tiny_overrides(tmp_path) if not o.startswith("mlflow.store_dir=")]
    return [*overrides, f"mlflow.store_dir={registry_store}", f"mlflow.registered_model=detector-{tmp_path.name}"]


@pytest.fixture
def registry_cfg(registry_overrides):
    """The composed config of ``registry_overrides``, with MLflow pointed at the store."""
    from detloop.core.config import compose
    from detloop.tracking import runs

    cfg = compose(registry_overrides)
    runs.setup(cfg)
    return cfg


def register_version(cfg, tags: dict | None = None) -> str:
    """A new version of the registered model (a run's artifact path, no model files): cheap, for registry tests."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    name = cfg.mlflow.registered_model
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id
    run = client.create_run(experiment)
    tags = dict(tags or {})
    if "kind" in tags:  # the training run's immutable record of what it trained (as the training stages log it)
        client.log_param(run.info.run_id, "kind", tags["kind"])
    if tags.get("base_version"):
        client.log_param(run.info.run_id, "finetune.base_version", tags["base_version"])
    client.set_terminated(run.info.run_id)
    version = str(client.create_model_version(name, f"{run.info.artifact_uri}/model", run.info.run_id).version)
    if "gate.decision" in tags:
        log_gate_record(cfg, version, run.info.run_id, tags)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    return version


def log_gate_record(cfg, version: str, run_id: str, tags: dict) -> None:
    """The gate's record (``gate/decision.json`` in the run) that the tags ``gate.*`` summarise."""
    import json
    import tempfile

    import mlflow

    figures = {}
    for key, value in tags.items():
        if key.startswith("gate.") and key not in ("gate.decision", "gate.time", "gate.reference_version"):
            with contextlib.suppress(ValueError):
                figures[key] = float(value)
    record = {
        "skipped": False,
        "decision": tags["gate.decision"],
        "candidate": {"name": cfg.mlflow.registered_model, "version": version, "kind": tags.get("kind", "")},
        "production": {"version": tags.get("gate.reference_version", ""), "alias": "production"},
        "figures": figures,
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gate"
        folder.mkdir()
        (folder / "decision.json").write_text(json.dumps(record))
        mlflow.MlflowClient().log_artifacts(run_id, str(folder), artifact_path="gate")


# the basic-auth app's admin login of servers started with mlflow_server(..., auth=True)
AUTH_ADMIN = ("admin", "detloop-test-admin-password")
_SERVERS: dict = {}  # uri -> the running server started by mlflow_server (for kill_server)


def _auth_env(folder: Path) -> dict[str, str]:
    """The environment of ``mlflow server --app-name basic-auth``: an ini (users in ``folder/auth.db``,
    default permission READ, the admin login :data:`AUTH_ADMIN`) and a Flask secret."""
    ini = folder / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{folder / 'auth.db'}\n"
        f"admin_username = {AUTH_ADMIN[0]}\n"
        f"admin_password = {AUTH_ADMIN[1]}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "auth_cache_ttl_seconds = 300\n"  # checks each (user, password) once, not PBKDF2 on every request
    )
    return {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": "detloop-test-secret"}


@contextlib.contextmanager
def mlflow_server(
    backend: Path, artifacts: Path, log: Path, *, proxied: bool = True, env: dict | None = None, auth: bool = False
):
    """A real ``mlflow server`` over the SQLite file ``backend`` on a free loopback port; yields its URI.

    ``proxied``: artifacts served by the server (``--artifacts-destination``), else ``--default-artifact-root``.
    ``auth``: MLflow's basic-auth app (``--app-name basic-auth``), users kept beside ``log`` (a restart with the
    same ``log`` folder keeps them), admin login :data:`AUTH_ADMIN`, default permission READ.
    Started by the team stack's starter (:func:`detloop.team.stack.mlflow_server`): in its own session,
    stopped by process group, so the CLI's job-runner child goes too (:func:`kill_server` kills it earlier).
    """
    from detloop.team.stack import mlflow_server as running_server

    server_env = {**os.environ, **(_auth_env(log.parent) if auth else {}), **(env or {})}
    app = "basic-auth" if auth else None
    with running_server(
        f"sqlite:///{backend}", str(artifacts), log, proxied=proxied, env=server_env, app_name=app
    ) as server:
        _SERVERS[server.uri] = server
        try:
            yield server.uri
        finally:
            _SERVERS.pop(server.uri, None)


def kill_server(uri: str) -> None:
    """SIGKILL the server that :func:`mlflow_server` started at ``uri`` (its whole process group), now."""
    import signal

    server = _SERVERS[uri]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.proc.pgid, signal.SIGKILL)
    if server.popen is not None:
        server.popen.wait()


def wait_healthy(url: str, proc, what: str, timeout: float = 120.0, log: Path | None = None) -> None:
    """Wait until ``url``/health answers 200; kill ``proc`` and fail with ``what`` (and its log) if it never does."""
    from detloop.team.process import wait_healthy as wait

    try:
        wait(url, proc, what, timeout, log)
    except RuntimeError:
        if proc.poll() is None:
            proc.kill()
        raise
