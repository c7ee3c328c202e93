"""Fixtures for unit tests that change data: a private copy of the tiny demo data per test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tests.conftest import tiny_overrides


@pytest.fixture
def overrides(tmp_path: Path, tiny_data: Path) -> list[str]:
    """Overrides for a private, writable copy of the tiny demo data (anchor, pool of 12, inbox of 4)."""
    shutil.copytree(tiny_data, tmp_path / "data")
    return tiny_overrides(tmp_path)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """The private copy's data folder (see ``overrides``)."""
    return tmp_path / "data"
