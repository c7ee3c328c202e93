"""The recipe search's rules: its space, objective, when it is due, the next recipe, the first trial,
and how a trial's recipe uses the mix (always with replay)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from detloop.core.config import compose
from detloop.core.errors import BadInput
from detloop.data.mixing import reweight
from detloop.evaluation import recipes
from detloop.training.sampler import FirstTrialTPE, flatten


@pytest.fixture
def cfg():
    return compose(["experiment=tiny"])


def test_the_default_space_covers_the_recipe_keys_the_issue_names(cfg):
    space = recipes.space(cfg)
    assert set(space) == {
        "finetune.train.freeze",
        "finetune.train.lr0",
        "finetune.train.epochs",
        "finetune.train.imgsz",
        "finetune.replay.scale",
    }
    assert space["finetune.train.lr0"] == "tag(log, interval(0.001, 0.02))"


@pytest.mark.parametrize(
    ("override", "where"),
    [
        ("+search.space.start={base_version: 'choice(1, 2)'}", "search.space.start: only the groups train"),
        ("+search.space.train.seed='choice(0, 1)'", "search.space.train.seed"),
        ("+search.space.train.device='choice(cpu, 0)'", "search.space.train.device"),
        ("+search.space.train.flipud='choice(0.0, 0.5)'", "conf/finetune has no key finetune.train.flipud"),
        ("search.space.train.lr0='interval(0.001'", "search.space.train.lr0"),
        ("search.space.train.lr0='0.01'", "is one value"),
    ],
)
def test_a_space_that_breaks_a_rule_or_does_not_parse_is_refused_by_key(override, where):
    cfg = compose(["experiment=tiny", override])
    with pytest.raises(BadInput) as err:
        recipes.space(cfg)
    assert where in str(err.value.render() if hasattr(err.value, "render") else err.value)


def test_the_objective_is_the_gate_2_rate_only_when_every_other_gate_passes():
    def record(rate, **decisions):
        gates = {"new_samples": {"decision": "review"}, **{k: {"decision": v} for k, v in decisions.items()}}
        return {"figures": {recipes.RATE: rate}, "gates": gates}

    assert recipes.objective(record(0.7, regression="pass")) == pytest.approx(0.7)
    assert recipes.objective(record(0.95, regression="review")) == pytest.approx(-0.05)
    assert recipes.objective(record(0.95, regression="pass", ab="reject")) == pytest.approx(-0.05)
    # any trial that keeps the anchor ranks above every trial that does not
    assert recipes.objective(record(0.01, regression="pass")) > recipes.objective(record(0.99, regression="reject"))
    assert recipes.objective({"figures": {}, "gates": {}}) is None


def test_the_search_is_due_only_when_gate_2_did_not_pass():
    assert recipes.due({"skipped": True, "reason": "no trigger"}) == (False, "no fine-tune candidate (no trigger)")
    passed = {"candidate": {"version": "3"}, "gates": {"new_samples": {"decision": "pass"}}}
    assert recipes.due(passed)[0] is False
    review = {"candidate": {"version": "3"}, "gates": {"new_samples": {"decision": "review"}}}
    assert recipes.due(review) == (True, "v3 did not pass Gate 2 (new samples: review)")


def test_the_next_recipe_frees_the_backbone_and_raises_lr0_within_the_bounds(cfg):
    assert recipes.next_recipe(cfg) == {
        "finetune.train.freeze": 0,
        "finetune.train.lr0": 0.01,
        "finetune.train.epochs": 10,
        "finetune.train.imgsz": 160,
        "finetune.replay.scale": 1.0,
    }
    capped = compose(["experiment=tiny", "finetune.train.lr0=0.005", "finetune.train.imgsz=200"])
    nxt = recipes.next_recipe(capped)
    assert nxt["finetune.train.lr0"] == 0.02  # x10 capped at the bound
    assert nxt["finetune.train.imgsz"] == 224  # a value outside a choice moves to the nearest choice


def test_the_sweeper_gets_the_next_recipe_as_its_first_trial(cfg):
    args = recipes.sweeper_arguments(cfg)
    assert "hydra/sweeper=optuna" in args and "hydra/sweeper/sampler=recipe" in args
    first = next(a for a in args if a.startswith("hydra.sweeper.sampler.first="))
    assert first == (
        "hydra.sweeper.sampler.first={finetune: {train: {freeze: 0, lr0: 0.01, epochs: 10, imgsz: 160}, "
        "replay: {scale: 1.0}}}"
    )
    assert recipes.sweep_command(cfg).startswith("python -m detloop.finetune -m hydra/sweeper=optuna")


def test_the_first_trial_sampler_proposes_the_given_values_then_explores():
    sampler = FirstTrialTPE(first={"a": {"x": 0.9}, "b": 3}, seed=0)
    assert flatten({"a": {"x": 0.9}, "b": 3}) == {"a.x": 0.9, "b": 3}
    study = optuna.create_study(direction="maximize", sampler=sampler)
    seen = []
    for _ in range(3):
        trial = study.ask()
        seen.append((trial.suggest_float("a.x", 0.0, 1.0), trial.suggest_categorical("b", [1, 2, 3])))
        study.tell(trial, 0.0)
    assert seen[0] == (0.9, 3)
    assert seen[1] != seen[0] and seen[2] != seen[0]
    # a first value outside the distribution is left to the sampler
    outside = FirstTrialTPE(first={"b": 7}, seed=0)
    trial = optuna.create_study(sampler=outside).ask()
    assert trial.suggest_categorical("b", [1, 2, 3]) in (1, 2, 3)


def lines(root: Path, n_pool: int, n_anchor: int) -> list[str]:
    return [f"data/pool/images/p{i}.jpg" for i in range(n_pool)] + [
        f"data/anchor/images/train/a{i}.jpg" for i in range(n_anchor)
    ]


def test_a_recipe_uses_a_seeded_share_of_the_replay_and_repeats_the_pool(tmp_path):
    train = lines(tmp_path, 3, 10)
    pool_dir = tmp_path / "data" / "pool"
    same = reweight(train, pool_dir, tmp_path, 1.0, 1, seed=5)
    assert same["train"] == train and (same["pool"], same["replay"], same["replay_kept"]) == (3, 10, 10)
    half = reweight(train, pool_dir, tmp_path, 0.5, 2, seed=5)
    assert half["replay_kept"] == 5 and half["train"][:6] == train[:3] * 2
    assert half == reweight(train, pool_dir, tmp_path, 0.5, 2, seed=5)  # the same seed, the same pages
    assert set(half["train"][6:]) <= set(train[3:])
    tiny = reweight(train, pool_dir, tmp_path, 0.01, 1, seed=5)
    assert tiny["replay_kept"] == 1  # never new data alone


@pytest.mark.parametrize(
    ("scale", "repeat", "key"),
    [(0.0, 1, "finetune.replay.scale"), (1.5, 1, "finetune.replay.scale"), (1.0, 0, "finetune.replay.pool_repeat")],
)
def test_replay_settings_out_of_range_are_refused_by_key(tmp_path, scale, repeat, key):
    with pytest.raises(BadInput) as err:
        reweight(lines(tmp_path, 2, 4), tmp_path / "data" / "pool", tmp_path, scale, repeat, seed=0)
    assert key in str(err.value.render())


def test_a_mix_without_replayed_pages_is_refused(tmp_path):
    with pytest.raises(BadInput, match="never new data alone"):
        reweight(lines(tmp_path, 3, 0), tmp_path / "data" / "pool", tmp_path, 1.0, 1, seed=0)
