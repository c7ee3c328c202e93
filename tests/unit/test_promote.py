"""The promote stage, human promotion and rollback, against a real MLflow SQLite store (no training)."""

from __future__ import annotations

import json

import mlflow
import pytest
from tests.conftest import register_version

from detloop.cli.main import main
from detloop.core.errors import BadInput
from detloop.core.stage import stage_dir, write_json
from detloop.promote import run as run_promote
from detloop.tracking import registry
from detloop.tracking.promotion import promote_version, rollback

FIGURES = {"gate.regression.drop": 0.4, "gate.new_samples.detection_rate": 0.9333}


def bootstrap(cfg) -> str:
    """Given a first base model holding ``base`` and ``production`` (as the base stage leaves it)."""
    version = register_version(cfg, {"kind": "base", "decision": "bootstrap"})
    registry.move_alias(cfg, "base", version, why="base stage trained a new base model", decision="base")
    registry.move_alias(cfg, "production", version, why="bootstrap", decision="bootstrap")
    return version


def gated(cfg, decision: str, kind: str = "finetune") -> str:
    """A new version with the tags the gate sets."""
    tags = {"kind": kind, "decision": decision, "gate.decision": decision, "gate.time": "2026-01-01T00:00:00+00:00"}
    return register_version(cfg, {**tags, **{k: f"{v:.4f}" for k, v in FIGURES.items()}})


def write_decision(cfg, version: str, decision: str, kind: str = "finetune", file: str = "decision.json") -> None:
    """The gate's decision file for ``version``, measured against the current holder of production (or base)."""
    alias = "base" if kind == "base" else "production"
    record = {
        "skipped": False,
        "decision": decision,
        "candidate": {"name": cfg.mlflow.registered_model, "version": version, "kind": kind, "run_id": "r"},
        "production": {"version": registry.alias_holder(cfg.mlflow.registered_model, alias), "alias": alias},
        "gates": {"regression": {"decision": decision, "drop": 0.4}},
        "figures": {**FIGURES, "gate.new_samples.per_class.title": 0.9},
        "summary": f"v{version} vs v1: {decision.upper()}\nGate 1 ...",
    }
    write_json(stage_dir(cfg, "gate") / file, record)


def holders(cfg) -> dict[str, str | None]:
    return {alias: registry.alias_holder(cfg.mlflow.registered_model, alias) for alias in registry.ALIASES}


def tags_of(cfg, version: str) -> dict:
    return dict(registry.client().get_model_version(cfg.mlflow.registered_model, version).tags)


def audit_runs(cfg) -> list:
    """The audit runs of this test's model, oldest first."""
    return mlflow.search_runs(
        experiment_names=[cfg.mlflow.audit_experiment],
        output_format="list",
        filter_string=f"tags.`audit.model` = '{cfg.mlflow.registered_model}'",
        order_by=["attributes.start_time ASC"],
    )


def moves(cfg, alias: str = "production") -> list[tuple[str, str, str]]:
    return [(m["from_version"], m["to_version"], m["decision"]) for m in registry.history(cfg) if m["alias"] == alias]


# --------------------------------------------------------------------------- the stage


def test_pass_gives_production_to_the_finetune_and_keeps_the_previous_for_rollback(registry_cfg):
    cfg = registry_cfg
    base = bootstrap(cfg)
    candidate = gated(cfg, "pass")
    write_decision(cfg, candidate, "pass")
    # when the stage runs
    result = run_promote(cfg)
    # then the candidate holds production, the base keeps base, the old version is still registered
    assert holders(cfg) == {"base": base, "staging": None, "production": candidate}
    assert tags_of(cfg, candidate)["rollback_to"] == base
    assert result["finetune"] == {
        "decision": "pass",
        "candidate": {"name": cfg.mlflow.registered_model, "version": candidate, "kind": "finetune"},
        "alias": "production",
        "from": base,
        "to": candidate,
    }
    # and the move is in the audit trail with the gate's figures (per-class figures left out)
    assert moves(cfg)[-1] == (base, candidate, "pass")
    audit = audit_runs(cfg)[-1]
    assert audit.data.metrics == FIGURES
    assert audit.data.tags["audit.kind"] == "finetune"


def test_rerunning_the_stage_records_nothing_and_writes_the_same_files(registry_cfg):
    cfg = registry_cfg
    bootstrap(cfg)
    candidate = gated(cfg, "pass")
    write_decision(cfg, candidate, "pass")
    run_promote(cfg)
    out = stage_dir(cfg, "promote")
    first = {name: (out / name).read_text() for name in ("result.json", "lineage.json")}
    before = registry.history(cfg)
    # when the stage runs again
    run_promote(cfg)
    # then no second audit record, identical outputs
    assert registry.history(cfg) == before
    assert {name: (out / name).read_text() for name in first} == first
    assert json.loads(first["lineage.json"])["decisions"]["finetune"]["candidate"]["version"] == candidate


def test_review_stages_the_candidate_and_leaves_production(registry_cfg):
    cfg = registry_cfg
    base = bootstrap(cfg)
    candidate = gated(cfg, "review")
    write_decision(cfg, candidate, "review")
    result = run_promote(cfg)
    assert holders(cfg) == {"base": base, "staging": candidate, "production": base}
    assert result["finetune"]["alias"] == "staging" and moves(cfg, "staging") == [("", candidate, "review")]


def test_reject_tags_the_candidate_and_moves_no_alias(registry_cfg):
    cfg = registry_cfg
    base = bootstrap(cfg)
    candidate = gated(cfg, "reject")
    write_decision(cfg, candidate, "reject")
    before = registry.history(cfg)
    result = run_promote(cfg)
    assert holders(cfg) == {"base": base, "staging": None, "production": base}
    assert tags_of(cfg, candidate)["decision"] == "reject"
    assert registry.history(cfg) == before
    assert result["finetune"]["alias"] is None and result["finetune"]["to"] is None


def test_a_skipped_gate_does_nothing(registry_cfg):
    cfg = registry_cfg
    base = bootstrap(cfg)
    write_json(stage_dir(cfg, "gate") / "decision.json", {"skipped": True, "reason": "finetune: waiting: 3/50"})
    before = registry.history(cfg)
    result = run_promote(cfg)
    assert result == {"finetune": {"decision": "skipped", "reason": "finetune: waiting: 3/50", "alias": None}}
    assert registry.history(cfg) == before and holders(cfg)["production"] == base


def test_a_passing_retrained_base_takes_base_and_production_is_untouched(registry_cfg):
    cfg = registry_cfg
    old_base = bootstrap(cfg)
    finetune = gated(cfg, "pass")
    registry.move_alias(cfg, "production", finetune, why="earlier pass", decision="pass")
    retrained = gated(cfg, "pass", kind="base")
    write_json(stage_dir(cfg, "gate") / "decision.json", {"skipped": True, "reason": "no fine-tune"})
    write_decision(cfg, retrained, "pass", kind="base", file="retrain.json")
    result = run_promote(cfg)
    assert holders(cfg) == {"base": retrained, "staging": None, "production": finetune}
    assert result["retrain"]["from"] == old_base and "rollback_to" not in tags_of(cfg, retrained)


def test_no_auto_production_stages_a_passing_finetune(registry_cfg, registry_overrides):
    from detloop.core.config import compose

    cfg = compose([*registry_overrides, "promote.auto_production=false"])
    base = bootstrap(cfg)
    candidate = gated(cfg, "pass")
    write_decision(cfg, candidate, "pass")
    run_promote(cfg)
    assert holders(cfg) == {"base": base, "staging": candidate, "production": base}


def test_the_stage_does_not_undo_a_human_rollback(registry_cfg):
    cfg = registry_cfg
    base = bootstrap(cfg)
    candidate = gated(cfg, "pass")
    write_decision(cfg, candidate, "pass")
    run_promote(cfg)
    rollback(cfg, reviewer="ops", reason="complaints")
    # when the stage runs again on the same decision (e.g. dvc repro --force)
    result = run_promote(cfg)
    # then production stays where the human put it
    assert holders(cfg)["production"] == base
    assert result["finetune"]["to"] == candidate  # the same result file as the first run


def test_a_pass_measured_against_a_replaced_production_waits_in_staging(registry_cfg):
    cfg = registry_cfg
    base = bootstrap(cfg)
    candidate, other = gated(cfg, "pass"), gated(cfg, "pass")
    write_decision(cfg, candidate, "pass")  # gated against v1
    promote_version(cfg, other, reviewer="a.chen", reason="shipped first")
    # when the stage runs (twice)
    first = run_promote(cfg)
    second = run_promote(cfg)
    # then the candidate waits in staging and production stays with the human's choice
    assert holders(cfg) == {"base": base, "staging": candidate, "production": other}
    assert first == second and first["finetune"]["alias"] == "staging"


def test_a_decision_file_that_disagrees_with_the_version_tag_is_refused(registry_cfg):
    cfg = registry_cfg
    bootstrap(cfg)
    candidate = gated(cfg, "review")
    write_decision(cfg, candidate, "pass")
    with pytest.raises(BadInput, match=f"version {candidate}.*gate.decision"):
        run_promote(cfg)
    assert holders(cfg)["production"] == "1"


def test_a_broken_decision_file_names_the_file_and_keys(registry_cfg):
    cfg = registry_cfg
    path = stage_dir(cfg, "gate") / "decision.json"
    write_json(path, {"skipped": False, "decision": "ship it", "candidate": {"version": "x", "kind": "finetune"}})
    with pytest.raises(BadInput) as err:
        run_promote(cfg)
    text = err.value.render()
    assert str(path) in text and "'decision'" in text and "'candidate.version'" in text and "'candidate.name'" in text


def test_without_a_gate_decision_the_stage_says_which_files_it_needs(registry_cfg):
    with pytest.raises(BadInput, match="no gate decision") as err:
        run_promote(registry_cfg)
    assert "decision.json" in err.value.render() and "retrain.json" in err.value.render()


# --------------------------------------------------------------------------- promote VERSION


def test_promote_refuses_a_version_without_a_gate_record(registry_cfg):
    cfg = registry_cfg
    bootstrap(cfg)
    ungated = register_version(cfg, {"kind": "finetune"})
    with pytest.raises(BadInput, match=f"version {ungated}.*gate.decision"):
        promote_version(cfg, ungated, reviewer="a.chen", reason="looks good")
    assert holders(cfg)["production"] == "1"


def test_promote_refuses_a_rejected_version_unless_forced_and_records_the_force(registry_cfg):
    cfg = registry_cfg
    bootstrap(cfg)
    rejected = gated(cfg, "reject")
    with pytest.raises(BadInput, match=f"version {rejected}.*gate.decision=reject"):
        promote_version(cfg, rejected, reviewer="a.chen", reason="urgent")
    # when forced
    result = promote_version(cfg, rejected, reviewer="a.chen", reason="hotfix for customer X", force=True)
    # then it moved, and the force is on the audit run and the version
    assert result == {"alias": "production", "from": "1", "to": rejected, "moved": True, "forced": True}
    tags = tags_of(cfg, rejected)
    assert tags["forced_promotion"] == "true" and tags["promoted_by"] == "a.chen"
    assert tags["promote_reason"] == "hotfix for customer X" and tags["rollback_to"] == "1"
    last = registry.history(cfg)[-1]
    assert (last["who"], last["why"], last["decision"], last["forced"]) == (
        "a.chen",
        "hotfix for customer X",
        "promote",
        True,
    )


def test_promoting_a_reviewed_version_takes_it_out_of_staging(registry_cfg):
    cfg = registry_cfg
    bootstrap(cfg)
    candidate = gated(cfg, "review")
    write_decision(cfg, candidate, "review")
    run_promote(cfg)
    result = promote_version(cfg, candidate, reviewer="a.chen", reason="checked the failures by eye")
    assert result["forced"] is False and holders(cfg) == {"base": "1", "staging": None, "production": candidate}
    assert registry.history(cfg)[-1]["forced"] is False
    assert moves(cfg, "staging")[-1] == (candidate, "", "promote")
    # and promoting it again changes nothing
    assert promote_version(cfg, candidate, reviewer="a.chen", reason="again")["moved"] is False


def test_base_only_goes_to_a_base_model_even_when_forced(registry_cfg):
    cfg = registry_cfg
    bootstrap(cfg)
    finetune = gated(cfg, "pass")
    with pytest.raises(BadInput, match="kind=finetune"):
        promote_version(cfg, finetune, reviewer="a.chen", reason="x", alias="base", force=True)


def test_a_gated_base_model_can_take_production_by_hand(registry_cfg):
    cfg = registry_cfg
    bootstrap(cfg)
    retrained = gated(cfg, "pass", kind="base")
    promote_version(cfg, retrained, reviewer="a.chen", reason="retrained base beats every fine-tune")
    assert holders(cfg)["production"] == retrained and holders(cfg)["base"] == "1"
    promoted = [r for r in audit_runs(cfg) if r.data.tags.get("audit.decision") == "promote"]
    assert [r.data.tags["audit.kind"] for r in promoted] == ["base"]


def test_promote_refuses_an_unknown_version_and_needs_who_and_why(registry_cfg):
    cfg = registry_cfg
    bootstrap(cfg)
    with pytest.raises(BadInput, match="version 42 .*does not exist"):
        promote_version(cfg, "42", reviewer="a.chen", reason="x")
    with pytest.raises(BadInput, match="--reason"):
        promote_version(cfg, "1", reviewer="a.chen", reason=" ")


# --------------------------------------------------------------------------- rollback


def three_productions(cfg) -> tuple[str, str, str]:
    """Given v1 (bootstrap) -> v2 -> v3 in production, each by a gate pass."""
    v1 = bootstrap(cfg)
    v2, v3 = gated(cfg, "pass"), gated(cfg, "pass")
    for version in (v2, v3):
        write_decision(cfg, version, "pass")
        run_promote(cfg)
    return v1, v2, v3


def test_rollback_twice_walks_back_instead_of_toggling(registry_cfg):
    cfg = registry_cfg
    v1, v2, v3 = three_productions(cfg)
    # when rolled back twice
    first = rollback(cfg, reviewer="ops", reason="false positives")
    second = rollback(cfg, reason="still bad")
    # then v3 -> v2 -> v1, both rolled-back versions tagged and still registered
    assert (first["from"], first["to"], second["from"], second["to"]) == (v3, v2, v2, v1)
    assert holders(cfg)["production"] == v1
    assert tags_of(cfg, v3)["rolled_back"] == "true" and tags_of(cfg, v2)["rolled_back"] == "true"
    assert moves(cfg)[-2:] == [(v3, v2, "rollback"), (v2, v1, "rollback")]
    assert registry.history(cfg)[-2]["who"] == "ops" and registry.history(cfg)[-1]["why"] == "still bad"
    # and a third has nowhere to go
    with pytest.raises(BadInput, match=f"no previous production version before v{v1}"):
        rollback(cfg)


def test_rollback_to_a_named_version(registry_cfg):
    cfg = registry_cfg
    v1, v2, v3 = three_productions(cfg)
    assert rollback(cfg, to=v1, reviewer="ops", reason="back to the base")["to"] == v1
    assert holders(cfg)["production"] == v1 and tags_of(cfg, v3)["rolled_back"] == "true"
    # rolling forward again clears the mark
    rollback(cfg, to=v3, reviewer="ops", reason="fixed upstream")
    assert holders(cfg)["production"] == v3 and "rolled_back" not in tags_of(cfg, v3)


def test_rollback_refuses_unknown_never_served_and_current_versions(registry_cfg):
    cfg = registry_cfg
    v1, v2, v3 = three_productions(cfg)
    staged = gated(cfg, "review")
    with pytest.raises(BadInput, match="version 99 .*does not exist"):
        rollback(cfg, to="99")
    with pytest.raises(BadInput, match=f"version {staged} never held 'production'"):
        rollback(cfg, to=staged)
    with pytest.raises(BadInput, match=f"version {v3} already holds"):
        rollback(cfg, to=v3)
    assert holders(cfg)["production"] == v3


def test_rollback_without_production_or_history_is_refused(registry_cfg):
    with pytest.raises(BadInput, match="nothing to roll back"):
        rollback(registry_cfg)


def test_a_move_interrupted_before_or_after_the_alias_call_is_settled(registry_cfg):
    cfg = registry_cfg
    v1 = bootstrap(cfg)
    v2 = gated(cfg, "pass")
    # given a process killed after opening the audit run, before moving the alias
    registry.record_move(cfg, "production", v1, v2, why="killed", who="w", decision="promote", figures=None)
    registry.reconcile(cfg, "production")
    assert registry.history(cfg)[-1]["state"] == "interrupted" and holders(cfg)["production"] == v1
    # given one killed after moving the alias, before finishing the audit run
    registry.record_move(cfg, "production", v1, v2, why="killed", who="w", decision="promote", figures=None)
    registry.client().set_registered_model_alias(cfg.mlflow.registered_model, "production", v2)
    assert registry.history(cfg)[-1]["state"] == "pending"
    # then the next rollback settles it first and walks back from v2
    assert rollback(cfg, reviewer="ops", reason="x")["to"] == v1
    assert [m["state"] for m in registry.history(cfg)][-3:] == ["interrupted", "done", "done"]


# --------------------------------------------------------------------------- registry view and CLI


def test_registry_table_and_json_show_the_gate_columns(registry_cfg, registry_overrides, capsys):
    cfg = registry_cfg
    bootstrap(cfg)
    candidate = gated(cfg, "pass")
    rows = registry.versions(cfg)
    assert rows[0]["decision"] == "pass"
    assert rows[0]["gate"] == {
        "decision": "pass",
        "new_samples.detection_rate": "0.9333",
        "regression.drop": "0.4000",
        "time": "2026-01-01T00:00:00+00:00",
    }
    table = registry.format_table(rows).splitlines()
    assert "gate1 drop" in table[0] and "gate2 rate" in table[0]
    assert table[1].split()[:7] == [candidate, "-", "finetune", "-", "pass", "0.40", "0.933"]
    assert main(["registry", "--json", *registry_overrides]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed[0]["gate"]["regression.drop"] == "0.4000"


def test_cli_promote_rollback_and_history(registry_cfg, registry_overrides, capsys):
    cfg = registry_cfg
    bootstrap(cfg)
    rejected, passed = gated(cfg, "reject"), gated(cfg, "pass")
    overrides = registry_overrides
    # a refused promotion: exit 2, the message names the version and the tag
    assert main(["promote", rejected, "--reviewer", "a.chen", "--reason", "try", *overrides]) == 2
    assert f"version {rejected}" in capsys.readouterr().err
    # a promotion, with overrides after the options
    assert main(["promote", passed, "--reviewer", "a.chen", "--reason", "reviewed the report", *overrides]) == 0
    assert f"production: v1 -> v{passed}" in capsys.readouterr().out
    # a rollback (reviewer defaults to the current user) and an unknown --to
    assert main(["rollback", "--reason", "alerts", *overrides]) == 0
    assert f"production: v{passed} -> v1 (rollback)" in capsys.readouterr().out
    assert main(["rollback", "--to", "77", *overrides]) == 2
    assert "version 77" in capsys.readouterr().err
    # the history shows from, to, who, why and decision
    assert main(["registry", "--history", *overrides]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"v1 -> v{passed}  by a.chen (promote): reviewed the report" in lines[-2]
    assert "(rollback): alerts" in lines[-1]


def test_cli_promote_requires_reviewer_and_reason():
    with pytest.raises(SystemExit) as exit_:
        main(["promote", "3", "--reason", "x"])
    assert exit_.value.code == 2
