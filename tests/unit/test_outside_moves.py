"""Alias moves made outside detloop and edited version tags, against a real MLflow SQLite registry.

``client.set_registered_model_alias`` is the call the MLflow UI's alias editor makes (the UI itself is
driven by clicks in tests/integration/test_ui_moves.py); edited tags are set with
``set_model_version_tag``, as the UI's tag editor does.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import pytest
from omegaconf import OmegaConf
from tests.conftest import register_version
from tests.unit.test_promote import FIGURES, bootstrap, gated, holders, tags_of, write_decision

from detloop.cli.main import main
from detloop.core.errors import BadInput
from detloop.promote import run as run_promote
from detloop.tracking import oversight, records, registry
from detloop.tracking.promotion import promote_version, rollback
from detloop.training.trainer import starting_version


def ui_move(cfg, alias: str, version: str) -> None:
    """What the MLflow UI's alias editor does."""
    registry.client().set_registered_model_alias(cfg.mlflow.registered_model, alias, version)


def with_policy(cfg, policy: str):
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    cfg.promote.ui_moves.policy = policy
    return cfg


def production_moves(cfg) -> list[tuple]:
    return [
        (m["from_version"], m["to_version"], m["decision"], m["external"], m["refused"])
        for m in registry.history(cfg)
        if m["alias"] == "production"
    ]


def promoted(cfg) -> tuple[str, str, str]:
    """v1 bootstrap base in production, v2 promoted by detloop (pass), v3 rejected, v4 passing, never served."""
    v1 = bootstrap(cfg)
    v2 = gated(cfg, "pass")
    promote_version(cfg, v2, reviewer="a.chen", reason="gate pass")
    v3 = gated(cfg, "reject")
    return v1, v2, v3


def test_a_move_to_a_passing_version_is_recorded_kept_and_rollback_walks_back_through_it(registry_cfg):
    cfg = registry_cfg
    v1, v2, _ = promoted(cfg)
    v4 = gated(cfg, "pass")
    ui_move(cfg, "production", v4)
    # when any detloop command looks at the registry
    found = oversight.watch(cfg)
    # then the move is an audit entry (from, to, gate status, who unknown) and it stays
    assert [(f["from"], f["to"], f["allowed"], f["gate_status"]) for f in found] == [(v2, v4, True, "pass")]
    assert production_moves(cfg)[-1] == (v2, v4, "external", True, False)
    assert "MLflow does not say who" in registry.history(cfg)[-1]["who"]
    assert holders(cfg)["production"] == v4
    assert oversight.watch(cfg) == []  # recorded once
    assert oversight.may_serve(cfg, "production", v4)[0]
    # and rollback goes back to the version the UI move replaced, then further
    assert rollback(cfg, reason="ui move undone")["to"] == v2
    assert rollback(cfg, reason="further")["to"] == v1


def test_enforce_puts_the_previous_holder_back_after_a_move_to_a_rejected_version(registry_cfg):
    cfg = with_policy(registry_cfg, "enforce")
    v1, v2, v3 = promoted(cfg)
    ui_move(cfg, "production", v3)
    assert not oversight.may_serve(cfg, "production", v3)[0]  # serve does not swap, even before watch runs
    found = oversight.watch(cfg)
    assert found[0]["refused"] and not found[0]["allowed"] and found[0]["gate_status"] == "reject"
    assert holders(cfg)["production"] == v2
    assert production_moves(cfg)[-2:] == [(v2, v3, "external", True, True), (v3, v2, "revert", False, False)]
    assert "refused.production" in tags_of(cfg, v3)
    # the history has no hole and rollback still walks back past the refused move
    assert rollback(cfg, reason="back to the base")["to"] == v1


def test_record_keeps_a_move_to_a_rejected_version_and_warns_everywhere_it_shows(registry_cfg, capsys):
    cfg = with_policy(registry_cfg, "record")
    _, v2, v3 = promoted(cfg)
    ui_move(cfg, "production", v3)
    found = oversight.watch(cfg)
    assert not found[0]["allowed"] and not found[0]["refused"]
    assert holders(cfg)["production"] == v3
    assert oversight.may_serve(cfg, "production", v3) == (True, found[0]["why"])
    overrides = [
        f"mlflow.store_dir={cfg.mlflow.store_dir}",
        f"mlflow.registered_model={cfg.mlflow.registered_model}",
        "promote.ui_moves.policy=record",
    ]
    capsys.readouterr()
    assert main(["registry", *overrides]) == 0
    out = capsys.readouterr().out
    assert f"WARNING: v{v3}: holds production through a move made outside detloop" in out
    assert main(["registry", "--history", *overrides]) == 0
    history = capsys.readouterr().out
    assert f"v{v2} -> v{v3}" in history and "[outside detloop] [breaks a rule]" in history
    # rollback returns to the version the UI replaced
    assert rollback(cfg, reason="ui move undone")["to"] == v2


def test_a_move_to_a_version_that_never_served_then_rollback_works(registry_cfg):
    """The audit thread is kept: rollback after a UI move to a fresh version returns to the one before."""
    cfg = registry_cfg
    v1 = bootstrap(cfg)
    v2 = gated(cfg, "pass")
    ui_move(cfg, "production", v2)
    assert rollback(cfg, reason="undo")["to"] == v1
    assert [m[:3] for m in production_moves(cfg)] == [("", v1, "bootstrap"), (v1, v2, "external"), (v2, v1, "rollback")]


def test_production_removed_in_the_ui_is_put_back_under_enforce(registry_cfg):
    cfg = registry_cfg
    _, v2, _ = promoted(cfg)
    registry.client().delete_registered_model_alias(cfg.mlflow.registered_model, "production")
    found = oversight.watch(cfg)
    assert found[0]["to"] is None and found[0]["refused"]
    assert holders(cfg)["production"] == v2


def test_base_moved_to_a_finetune_is_put_back_and_the_finetune_never_chains(registry_cfg):
    cfg = registry_cfg
    v1, v2, _ = promoted(cfg)
    ui_move(cfg, "base", v2)
    assert starting_version(cfg) == v1  # watch put base back before the fine-tune chose its start
    assert holders(cfg)["base"] == v1
    recorded = with_policy(cfg, "record")
    ui_move(recorded, "base", v2)
    with pytest.raises(BadInput, match=f"refusing to fine-tune from version {v2} .kind=finetune"):
        starting_version(recorded)


def test_a_webhook_delivery_is_verified_and_records_the_move_with_its_time(registry_cfg, monkeypatch):
    cfg = registry_cfg
    _, v2, _ = promoted(cfg)
    v4 = gated(cfg, "pass")
    monkeypatch.setenv("DETLOOP_WEBHOOK_SECRET", "s3cret")
    ui_move(cfg, "production", v4)
    body = json.dumps(
        {
            "entity": "model_version_alias",
            "action": "created",
            "timestamp": "2026-12-03T12:00:00+00:00",
            "data": {"name": cfg.mlflow.registered_model, "alias": "production", "version": v4},
        }
    ).encode()
    stamp = str(int(time.time()))
    signed = hmac.new(b"s3cret", f"d-1.{stamp}.{body.decode()}".encode(), hashlib.sha256).digest()
    headers = {
        "X-MLflow-Delivery-Id": "d-1",
        "X-MLflow-Timestamp": stamp,
        "X-MLflow-Signature": "v1," + base64.b64encode(signed).decode(),
    }
    # a forged or replayed delivery is refused and records nothing
    assert oversight.handle_delivery(cfg, {**headers, "X-MLflow-Signature": "v1,AAAA"}, body)[0] == 401
    old = {**headers, "X-MLflow-Timestamp": str(int(time.time()) - 3600)}
    assert oversight.handle_delivery(cfg, old, body)[0] == 401
    assert production_moves(cfg)[-1][2] != "external"
    # the signed one is recorded with the delivery's time and id
    status, answer = oversight.handle_delivery(cfg, headers, body)
    assert (
        status == 200
        and answer["recorded"][0]["to"] == v4
        and answer["recorded"][0]["time"] == "2026-12-03T12:00:00+00:00"
    )
    last = registry.history(cfg)[-1]
    assert last["external"] and last["to_version"] == v4 and last["from_version"] == v2
    assert registry.client().search_runs([registry.audit_experiment_id(cfg)], "tags.`audit.webhook_delivery` = 'd-1'")


# --------------------------------------------------------------------------- edited tags


def test_an_edited_gate_decision_is_detected_and_promotion_refused_until_repaired(registry_cfg, capsys):
    cfg = registry_cfg
    bootstrap(cfg)
    v2 = gated(cfg, "reject")
    name = cfg.mlflow.registered_model
    registry.client().set_model_version_tag(name, v2, "gate.decision", "pass")
    registry.client().set_model_version_tag(name, v2, "decision", "pass")
    proof = records.evidence(cfg, v2)
    assert proof.decision == "reject" and proof.tampered
    assert "tag gate.decision says 'pass', the gate record says 'reject'" in proof.explain()
    with pytest.raises(BadInput, match=f"version {v2}'s tags were edited outside detloop"):
        promote_version(cfg, v2, reviewer="m", reason="looks fine", force=True)
    assert holders(cfg)["production"] != v2
    overrides = [f"mlflow.store_dir={cfg.mlflow.store_dir}", f"mlflow.registered_model={name}"]
    capsys.readouterr()
    assert main(["registry", *overrides]) == 0
    out = capsys.readouterr().out
    assert "(tags edited!)" in out and f"WARNING: v{v2}: tags edited outside detloop: tag gate.decision" in out
    # repaired from the records, the version is what the gate said: rejected
    assert main(["registry", "--repair", v2, *overrides]) == 0
    assert tags_of(cfg, v2)["gate.decision"] == "reject" and not records.evidence(cfg, v2).tampered
    with pytest.raises(BadInput, match="was rejected"):
        promote_version(cfg, v2, reviewer="m", reason="looks fine")


def test_an_edited_figure_and_an_invented_decision_are_detected(registry_cfg):
    cfg = registry_cfg
    bootstrap(cfg)
    v2 = gated(cfg, "pass")
    name = cfg.mlflow.registered_model
    registry.client().set_model_version_tag(name, v2, "gate.regression.drop", "0.0100")
    assert "tag gate.regression.drop says 0.0100, the gate record says 0.4000" in records.evidence(cfg, v2).explain()
    ungated = register_version(cfg, {"kind": "finetune", "decision": "pass"})  # no gate ever ran
    assert "has no gate record" in records.evidence(cfg, ungated).explain()
    with pytest.raises(BadInput, match="tags were edited"):
        promote_version(cfg, ungated, reviewer="m", reason="r")


def test_an_edited_kind_does_not_let_a_finetune_become_a_base(registry_cfg):
    cfg = registry_cfg
    _, v2, _ = promoted(cfg)
    name = cfg.mlflow.registered_model
    registry.client().set_model_version_tag(name, v2, "kind", "base")
    assert records.evidence(cfg, v2).kind == "finetune"
    with pytest.raises(BadInput, match="only a base model can take 'base'|tags were edited"):
        promote_version(cfg, v2, reviewer="m", reason="r", alias="base", force=True)
    pinned = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    pinned.finetune.base_version = int(v2)
    with pytest.raises(BadInput, match="never chain fine-tunes"):
        starting_version(pinned)


def test_the_promote_stage_refuses_a_decision_whose_tags_were_edited(registry_cfg):
    cfg = registry_cfg
    bootstrap(cfg)
    v2 = gated(cfg, "review")
    write_decision(cfg, v2, "review")
    registry.client().set_model_version_tag(cfg.mlflow.registered_model, v2, "gate.decision", "pass")
    with pytest.raises(BadInput, match="tags were edited"):
        run_promote(cfg)
    assert holders(cfg)["staging"] is None


def test_a_bad_policy_names_the_key(registry_cfg):
    with pytest.raises(BadInput, match="promote.ui_moves.policy is 'lenient'"):
        oversight.watch(with_policy(registry_cfg, "lenient"))


def test_gate_figures_of_the_record_go_to_the_audit_run(registry_cfg):
    cfg = registry_cfg
    bootstrap(cfg)
    v2 = gated(cfg, "pass")
    assert records.evidence(cfg, v2).figures == pytest.approx(FIGURES)


def test_a_registry_set_up_without_detloop_is_adopted_not_emptied(registry_cfg):
    """Production set before detloop recorded anything: kept as the trail's starting point, never removed."""
    cfg = registry_cfg
    v1 = register_version(cfg, {"kind": "base"})  # no gate record, no audit trail
    ui_move(cfg, "production", v1)
    found = oversight.watch(cfg)
    assert found[0]["allowed"] and "first holder the audit trail sees" in found[0]["why"]
    assert holders(cfg)["production"] == v1
    v2 = gated(cfg, "pass")
    promote_version(cfg, v2, reviewer="r", reason="first gated")
    assert rollback(cfg, reason="back")["to"] == v1


def test_under_record_the_kept_holder_is_named_as_breaking_a_rule(registry_cfg):
    cfg = with_policy(registry_cfg, "record")
    _, v2, v3 = promoted(cfg)
    assert oversight.held_against_rules(cfg, "production", v2) is None
    ui_move(cfg, "production", v3)
    oversight.watch(cfg)
    assert "through a move made outside detloop that breaks a rule" in oversight.held_against_rules(
        cfg, "production", v3
    )
