"""Shared fixtures: a tiny demo project (data, build, MLflow store) in a temp folder."""

from __future__ import annotations

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
    from detloop.config import compose
    from detloop.demo_data import write_demo_data

    base = tmp_path_factory.mktemp("tiny-data")
    write_demo_data(compose(tiny_overrides(base)))
    return base / "data"


@pytest.fixture
def tiny_project(tmp_path, tiny_data) -> list[str]:
    """Overrides for a fresh build folder and MLflow store that read the shared tiny data."""
    overrides = tiny_overrides(tmp_path)
    overrides[1] = f"paths.data={tiny_data}"
    return overrides
