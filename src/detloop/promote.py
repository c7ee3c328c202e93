"""Stage ``promote``: act on the gate's decisions; and the human decisions ``detloop promote`` / ``rollback``.

``python -m detloop.promote [key=value ...]`` reads ``build/gate/decision.json`` (the fine-tune candidate)
and ``build/gate/retrain.json`` (a retrained base), whichever the gate wrote, and moves aliases:

* ``pass``: a fine-tune (``kind=finetune``) takes ``production``; a retrained base (``kind=base``) takes
  ``base`` (what every later fine-tune starts from) and production is untouched. The previous holder
  stays registered; for production it is tagged on the candidate as ``rollback_to``. With
  ``promote.auto_production=false`` a passing fine-tune takes ``staging`` and waits for a human.
* ``review``: the candidate takes ``staging`` and waits for ``detloop promote VERSION``. So does a pass
  measured against a version that no longer holds the alias (it moved between gate and promote).
* ``reject``: the candidate is tagged ``decision=reject``; no alias moves.
* skipped (no candidate): nothing.

Every move is one ``set_registered_model_alias`` call (atomic: exactly one holder at every moment)
and one audit run (:mod:`detloop.tracking.registry`). Re-running is idempotent: a candidate that already got
its alias from an earlier run is not moved again, not even after a human took the alias away from it
(a rollback is never undone by the pipeline). Outputs: ``build/promote/result.json`` (what was
decided and moved) and ``build/promote/lineage.json`` (the DVC output), both deterministic.

Human decisions (``detloop promote`` / ``detloop rollback``) are recorded with who and why:

* :func:`promote_version` needs the gate's record (tag ``gate.decision``) and refuses a rejected
  version unless forced; ``--force`` is recorded on the audit run and the version.
* A ``kind=base`` version may take ``production`` by hand (e.g. a retrained base that is better than
  every fine-tune). It needs the gate record like any version, but its gate compared it with the
  ``base`` holder, not with production; the audit run says so (``audit.kind=base``) and a warning is
  logged. ``base`` itself only ever goes to a ``kind=base`` version (fine-tunes never chain), forced or not.
* :func:`rollback` gives production back to the version that held it before the current holder got
  it through a non-rollback move (so two rollbacks in a row walk further back), or to ``--to VERSION``,
  which must have served in production before (anything else is a promotion, with its gate record).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from detloop.core.config import config_hash
from detloop.core.errors import BadInput
from detloop.core.stage import hydra_entry, read_json, stage_dir, write_json
from detloop.tracking import registry, runs
from detloop.tracking.promotion import clear_staging_of, last_move_to, version_tags

log = logging.getLogger(__name__)

STAGE = "promote"
# the gate's decision files: candidate source -> file in build/gate/
DECISION_FILES = {"finetune": "decision.json", "retrain": "retrain.json"}
DECISIONS = ("pass", "review", "reject")
KINDS = ("finetune", "base")


# --------------------------------------------------------------------------- the gate's decision


@dataclass(frozen=True)
class GateDecision:
    """One candidate's gate decision, as read from a gate decision file."""

    decision: str
    name: str
    version: str
    kind: str
    figures: dict
    summary: str
    reference: str  # the version the gate compared it with (``production.version``)

    def key(self) -> dict:
        return {"decision": self.decision, "candidate": {"name": self.name, "version": self.version, "kind": self.kind}}


def parse_decision(record: dict, path: Path, cfg: DictConfig) -> GateDecision:
    """Validate a gate record (``skipped: false``); every problem names the file and the key."""
    problems = []
    decision = record.get("decision")
    if decision not in DECISIONS:
        problems.append(f"{path}: key 'decision' is {decision!r}, not one of {', '.join(DECISIONS)}")
    candidate = record.get("candidate") if isinstance(record.get("candidate"), dict) else {}
    version, kind, name = str(candidate.get("version", "")), candidate.get("kind"), candidate.get("name")
    if not version.isdigit():
        problems.append(f"{path}: key 'candidate.version' is {candidate.get('version')!r}, not a version number")
    if kind not in KINDS:
        problems.append(f"{path}: key 'candidate.kind' is {kind!r}, not one of {', '.join(KINDS)}")
    if name != cfg.mlflow.registered_model:
        problems.append(
            f"{path}: key 'candidate.name' is {name!r}, but mlflow.registered_model is {cfg.mlflow.registered_model!r}"
        )
    if problems:
        raise BadInput(f"the gate decision {path} is not valid", problems)
    figures = record.get("figures") if isinstance(record.get("figures"), dict) else {}
    reference = str((record.get("production") or {}).get("version") or "")
    return GateDecision(decision, name, version, kind, figures, str(record.get("summary", "")), reference)


def target_alias(cfg: DictConfig, gate: GateDecision) -> str | None:
    """The alias a decision gives the candidate (None: no alias moves)."""
    if gate.decision == "reject":
        return None
    if gate.decision == "review":
        return "staging"
    if gate.kind == "base":
        return "base"
    return "production" if cfg.promote.auto_production else "staging"


# --------------------------------------------------------------------------- registry helpers


# --------------------------------------------------------------------------- the stage


def apply_decision(cfg: DictConfig, gate: GateDecision) -> dict:
    """Move the alias the decision gives the candidate (once); returns what was decided and moved."""
    name, version = gate.name, gate.version
    tags = version_tags(cfg, version)
    tagged = tags.get("gate.decision")
    if tagged != gate.decision:
        raise BadInput(
            f"version {version}: the gate decision file says {gate.decision!r}, the version's tag gate.decision is "
            f"{tagged!r}",
            ["the decision file is stale or the gate did not finish: run the gate again"],
        )
    alias = target_alias(cfg, gate)
    result = {**gate.key(), "alias": alias, "from": None, "to": None}
    if alias is None:
        registry.set_version_tags(name, version, {"decision": "reject"})
        log.info("v%s rejected by the gate: no alias moves", version)
        return result
    registry.reconcile(cfg, alias)
    holder = registry.alias_holder(name, alias)
    earlier = last_move_to(cfg, alias, version)
    moved_since = bool(gate.reference) and holder not in (None, version, gate.reference)
    if alias != "staging" and earlier is None and moved_since:
        log.warning(
            "v%s was gated against v%s, but v%s holds %s now: it waits in staging for a new gate or a human",
            version,
            gate.reference,
            holder,
            alias,
        )
        alias = result["alias"] = "staging"
        registry.reconcile(cfg, alias)
        holder, earlier = registry.alias_holder(name, alias), last_move_to(cfg, alias, version)
    if earlier is not None or holder == version:
        if holder != version:
            log.warning(
                "v%s got %s earlier and lost it since (v%s holds it): the pipeline does not move it back",
                version,
                alias,
                holder or "-",
            )
        else:
            log.info("v%s already holds %s: nothing to do", version, alias)
        previous = earlier["from_version"] if earlier else tags.get("rollback_to", "")
        return {**result, "from": previous or None, "to": version}
    if tags.get("rolled_back") == "true":
        log.warning("v%s was rolled back before: %s is not moved to it automatically", version, alias)
        return {**result, "alias": None}
    if alias == "production" and holder:
        registry.set_version_tags(name, version, {"rollback_to": holder})  # before the move: crash-safe
    why = f"gate {gate.decision}" + (f": {gate.summary.splitlines()[0]}" if gate.summary else "")
    numeric = {k: float(v) for k, v in gate.figures.items() if type(v) in (int, float) and ".per_class." not in k}
    previous = registry.move_alias(
        cfg,
        alias,
        version,
        why=why,
        decision=gate.decision,
        figures=numeric,
        tags={"audit.kind": gate.kind, "audit.stage": STAGE},
    )
    if alias == "production":
        clear_staging_of(cfg, version, who=None, why=why, decision=gate.decision)
    return {**result, "from": previous, "to": version}


def lineage_key(cfg: DictConfig, decisions: dict[str, dict]) -> dict:
    """The DVC output: the decisions acted on and the stage's config (the same on every machine)."""
    return {"stage": STAGE, "config_hash": config_hash(cfg.promote), "decisions": decisions}


def run(cfg: DictConfig) -> dict:
    """Act on each gate decision file present; write result.json and lineage.json."""
    out = stage_dir(cfg, STAGE)
    gate_dir = stage_dir(cfg, "gate")
    files = {src: gate_dir / f for src, f in DECISION_FILES.items() if (gate_dir / f).is_file()}
    if not files:
        raise BadInput(
            f"no gate decision in {gate_dir}",
            [f"{gate_dir / f}: missing; run the gate stage first" for f in DECISION_FILES.values()],
        )
    records = {src: read_json(path, "the gate decision (stage gate)") for src, path in files.items()}
    gates = {src: parse_decision(r, files[src], cfg) for src, r in records.items() if not r.get("skipped")}
    if gates:
        runs.setup(cfg)
    results: dict[str, dict] = {}
    for src, record in records.items():
        if record.get("skipped"):
            log.info("%s: nothing to promote (%s)", src, record.get("reason", ""))
            results[src] = {"decision": "skipped", "reason": str(record.get("reason", "")), "alias": None}
        else:
            results[src] = apply_decision(cfg, gates[src])
    write_json(out / "result.json", {"stage": STAGE, **results})
    lineage = {src: gates[src].key() if src in gates else {"decision": "skipped"} for src in records}
    write_json(out / "lineage.json", lineage_key(cfg, lineage))
    return results


# --------------------------------------------------------------------------- human decisions


main = hydra_entry(run)

if __name__ == "__main__":
    main()
