"""Every config group composes, and the keys passed to Ultralytics are Ultralytics' own."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from detloop.core.config import compose, config_hash

ROOT = Path(__file__).resolve().parents[2]
# hydra/ holds Hydra's own groups (the recipe search's sampler), not a detloop config group
GROUPS = sorted(p.name for p in (ROOT / "conf").iterdir() if p.is_dir() and p.name != "hydra")


def test_default_config_composes_and_resolves():
    cfg = compose([])
    OmegaConf.resolve(cfg)
    assert set(GROUPS) - {"experiment"} <= set(cfg.keys())


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")))
def test_every_experiment_composes(experiment):
    cfg = compose([f"experiment={experiment}"])
    OmegaConf.resolve(cfg)


def test_base_train_keys_are_ultralytics_train_arguments():
    from ultralytics.cfg import get_cfg

    known = set(vars(get_cfg()).keys())
    train = compose([]).base.train
    assert set(train.keys()) <= known, set(train.keys()) - known


def test_fine_tune_recipe_names_its_optimizer_so_lr0_is_honoured():
    assert compose([]).base.train.optimizer != "auto"


def test_config_hash_changes_with_a_value_and_only_then():
    a = compose([]).base
    b = compose(["base.train.epochs=3"]).base
    assert config_hash(a) == config_hash(compose([]).base)
    assert config_hash(a) != config_hash(b)


def test_pool_split_fractions_sum_to_one():
    split = compose([]).pool.split
    assert abs(sum(split.values()) - 1.0) < 1e-9


def test_the_team_profile_refuses_to_fall_back_to_the_local_store():
    import pytest

    from detloop.core.config import compose
    from detloop.core.errors import BadInput
    from detloop.tracking.store import tracking_uri

    # given the team profile without a server URI, then nothing falls back to a local SQLite store
    with pytest.raises(BadInput) as refused:
        tracking_uri(compose(["mlflow=server", "mlflow.tracking_uri=null"]))
    assert "MLFLOW_TRACKING_URI" in refused.value.render()
    # and with one, every stage and command uses it; the default profile still falls back
    assert tracking_uri(compose(["mlflow=server", "mlflow.tracking_uri=http://mlflow.example:5000"])) == (
        "http://mlflow.example:5000"
    )
    assert tracking_uri(compose(["mlflow.tracking_uri=null"])).startswith("sqlite:///")


def test_an_empty_overrides_argument_as_mlflow_run_passes_it_is_no_override(tmp_path):
    import subprocess
    import sys

    from detloop.core.config import compose

    # given MLproject's default `overrides: ""`, which `mlflow run . -e <stage>` passes as one '' argument
    assert compose(["", "  "]).mlflow.experiment == compose([]).mlflow.experiment
    done = subprocess.run(
        [sys.executable, "-m", "detloop.trigger", "", f"paths.build={tmp_path / 'build'}"],
        capture_output=True,
        text=True,
    )
    # then the stage runs with the other overrides instead of refusing the blank one
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "build" / "trigger" / "state.json").is_file()
