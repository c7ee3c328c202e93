"""The registry read without MLflow: the same versions MLflow's client returns, or a clear refusal."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from tests.conftest import ROOT, register_version

from detloop.core.errors import TrackingUnavailable
from detloop.tracking import store, versions


def fields(version) -> tuple:
    return (
        str(version.version),
        int(version.creation_timestamp),
        version.current_stage,
        version.run_id or None,
        dict(version.tags or {}),
    )


def test_the_direct_read_returns_what_mlflow_search_returns(registry_cfg):
    # given a registered model with base and fine-tune versions, tags edited after creation, one deleted
    # version, and another model in the same store
    cfg = registry_cfg
    name = cfg.mlflow.registered_model
    register_version(cfg, {"kind": "base"})
    register_version(cfg, {"kind": "finetune", "pool.size": "40", "note": "a 'quoted' value; with ; and ü"})
    third = register_version(cfg, {"kind": "finetune", "pool.size": "90"})
    register_version(cfg, {"kind": "finetune", "pool.size": "120"})
    client = mlflow.MlflowClient()
    client.set_model_version_tag(name, third, "pool.size", "95")
    client.delete_model_version_tag(name, third, "kind")
    client.delete_model_version(name, "4")
    client.set_registered_model_alias(name, "production", "2")
    other = f"{name}-other"
    client.create_registered_model(other)
    client.create_model_version(other, "file:///nowhere", tags={"kind": "finetune", "pool.size": "999"})
    # when the versions are read directly and through MLflow
    direct = store.sqlite_versions(store.tracking_uri(cfg), name)
    through_mlflow = client.search_model_versions(f"name='{name}'", max_results=10000)
    # then they are the same versions with the same fields, newest first
    assert direct is not None and [fields(v) for v in direct] == sorted(
        (fields(v) for v in through_mlflow), key=lambda f: -int(f[0])
    )
    assert [v.version for v in direct] == ["3", "2", "1"]
    assert direct[0].tags == {"pool.size": "95"}
    # and the trigger and retrain checks read them as before: v3 lost its kind, so v2 is the last fine-tune
    assert versions.last_finetune(cfg)["version"] == "2" and versions.last_finetune(cfg)["pool_size"] == 40
    assert versions.last_base(cfg) == {"version": "1", "pool_size": 0}


def test_the_known_schema_is_the_installed_mlflow_one():
    # the direct read is only used on the schema revision the pinned MLflow writes: a new MLflow
    # (another Alembic head) must be looked at before this module reads its tables
    from alembic.script import ScriptDirectory

    migrations = Path(mlflow.__file__).parent / "store" / "db_migrations"
    assert set(ScriptDirectory(str(migrations)).get_heads()) <= store.SCHEMA_REVISIONS


def test_another_schema_revision_goes_through_mlflow(registry_cfg, tmp_path):
    # given a copy of the store whose schema revision is not one the module knows
    register_version(registry_cfg, {"kind": "base"})
    db = store.sqlite_file(store.tracking_uri(registry_cfg))
    copy = tmp_path / "other.db"
    shutil.copyfile(db, copy)
    with sqlite3.connect(copy) as con:
        con.execute("UPDATE alembic_version SET version_num = 'ffffffffffff'")
    # then the direct read declines (None), and the database is untouched
    before = copy.read_bytes()
    assert store.sqlite_versions(f"sqlite:///{copy}", registry_cfg.mlflow.registered_model) is None
    assert copy.read_bytes() == before


def test_no_store_yet_holds_no_versions_and_a_broken_one_is_named(tmp_path):
    assert store.sqlite_versions(f"sqlite:///{tmp_path / 'absent' / 'mlflow.db'}", "m") == []
    assert not (tmp_path / "absent").exists()  # reading creates nothing
    broken = tmp_path / "mlflow.db"
    broken.write_bytes(b"this is not a database" * 100)
    with pytest.raises(TrackingUnavailable, match=str(broken)):
        store.sqlite_versions(f"sqlite:///{broken}", "m")
    assert store.sqlite_versions("http://mlflow.example:5000", "m") is None
    assert store.sqlite_versions("postgresql://u@db/mlflow", "m") is None


def test_the_mix_stage_does_not_import_mlflow(tiny_project):
    # the stage reads the registry directly from the project's SQLite store: no MLflow import cost
    code = (
        "import sys\n"
        "from detloop.core.config import compose\n"
        "from detloop import mix\n"
        f"record = mix.run(compose({tiny_project!r}))\n"
        "assert 'mlflow' not in sys.modules, sorted(m for m in sys.modules if m.startswith('mlflow'))[:5]\n"
        "print(record['trigger'])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "new train samples" in done.stdout
