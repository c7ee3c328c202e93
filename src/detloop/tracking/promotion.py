"""Human promotion and rollback: ``detloop promote VERSION`` and ``detloop rollback``.

Every move is one registry call plus an audit run (``registry.move_alias``). A version without a
gate record, or a rejected one, is refused unless forced (recorded).

The ``promote`` stage acts on the gate's decisions with :func:`apply_decision`.

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

from mlflow.exceptions import MlflowException
from omegaconf import DictConfig

from detloop.core.errors import BadInput, MoveConflict
from detloop.tracking import oversight, records, registry

log = logging.getLogger(__name__)


def version_tags(cfg: DictConfig, version: str) -> dict[str, str]:
    """The tags of an existing version; BadInput naming the version if there is no such version."""
    name = cfg.mlflow.registered_model
    if not str(version).isdigit():
        raise BadInput(f"{version!r} is not a version number of {name}", ["give its number (see detloop registry)"])
    try:
        return dict(registry.client().get_model_version(name, str(version)).tags or {})
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise BadInput(f"version {version} of {name} does not exist", ["see `detloop registry`"]) from err


def last_move_to(cfg: DictConfig, alias: str, version: str) -> dict | None:
    """The newest recorded move (that happened) giving ``alias`` to ``version``, or None."""
    moves = [m for m in registry.history(cfg) if m["state"] == "done" and m["alias"] == alias and not m["refused"]]
    return next((m for m in reversed(moves) if m["to_version"] == str(version)), None)


def gate_figures(tags: dict) -> dict[str, float]:
    """The numeric gate figures (``gate.*``, per-class ones left out) of a gate record, for the audit run."""
    out = {}
    for key, value in tags.items():
        if key.startswith("gate.") and ".per_class." not in key:
            try:
                out[key] = float(value)
            except (TypeError, ValueError):
                continue
    return out


def took_production(cfg: DictConfig, version: str) -> None:
    """A version back in production is no longer a rolled-back one."""
    name = cfg.mlflow.registered_model
    if registry.client().get_model_version(name, version).tags.get("rolled_back"):
        registry.client().delete_model_version_tag(name, version, "rolled_back")


def _required(value: str | None, option: str) -> str:
    if not value or not value.strip():
        raise BadInput(f"{option} is required", [f"{option}: who decides and why is recorded with every promotion"])
    return value.strip()


def promote_version(
    cfg: DictConfig, version: str, *, reviewer: str, reason: str, force: bool = False, alias: str = "production"
) -> dict:
    """A human gives ``alias`` to ``version``; returns ``{alias, from, to, moved, forced}``.

    Refuses (BadInput, nothing changed) a version without the gate's record (tag ``gate.decision``)
    or one the gate rejected, unless ``force``; a forced promotion is recorded (``audit.forced=true``
    on the audit run, ``forced_promotion=true`` on the version). ``base`` only goes to ``kind=base``.
    Refuses (MoveConflict, exit 2, nothing changed, the attempt recorded as refused) when another move
    of ``alias`` is in flight or its holder changed after this call read it: two people promoting at
    once, exactly one wins and the other is told who holds or moves the alias.
    """
    reviewer, reason = _required(reviewer, "--reviewer"), _required(reason, "--reason")
    if alias not in registry.ALIASES:
        raise BadInput(f"unknown alias {alias!r}", [f"--alias: one of {', '.join(registry.ALIASES)}"])
    name, version = cfg.mlflow.registered_model, str(version).strip()
    tags = version_tags(cfg, version)
    oversight.watch(cfg)
    proof = trusted(cfg, version, tags)
    kind, gated = proof.kind or "", proof.decision
    if alias == "base" and kind != "base":
        raise BadInput(
            f"version {version} is kind={kind or '?'}: only a base model can take 'base'",
            ["fine-tunes always start from a base model; they are never chained (kind from the training run's params)"],
        )
    needs_force = gated is None or gated == "reject"
    if needs_force and not force:
        problem = (
            f"has no gate record ({records.GATE_RECORD} in its run)"
            if gated is None
            else "was rejected (gate.decision=reject in its gate record)"
        )
        hints = [f"gate it first, or pass --force to override (recorded as forced on v{version})"]
        if alias == "production" and last_move_to(cfg, "production", version):
            hints.append(f"it served in production before: detloop rollback --to {version}")
        raise BadInput(f"refusing to promote version {version}: it {problem}", hints)
    holder = registry.alias_holder(name, alias)
    if holder == version:
        log.info("v%s already holds %s: nothing changed", version, alias)
        return {"alias": alias, "from": holder, "to": version, "moved": False, "forced": False}
    if kind == "base" and alias == "production":
        log.warning(
            "v%s is a base model: its gate compared it with base v%s, not with production v%s",
            version,
            proof.reference or "?",
            holder or "-",
        )
    forced = force and needs_force
    new_tags = {"promoted_by": reviewer, "promote_reason": reason}
    if alias == "production" and holder:
        new_tags["rollback_to"] = holder
    if forced:
        new_tags["forced_promotion"] = "true"
    audit = {"audit.kind": kind, "audit.gate_decision": gated or "", **({"audit.forced": "true"} if forced else {})}
    previous = registry.move_alias(
        cfg,
        alias,
        version,
        why=reason,
        who=reviewer,
        decision="promote",
        figures=gate_figures(proof.figures),
        tags=audit,
        expected=holder,  # the decision was made against this holder: refused (MoveConflict) if it changed
        version_tags=new_tags,  # only once the move may go ahead
    )
    if previous == version:  # someone else gave it the alias in the meantime
        log.info("v%s already holds %s: nothing changed", version, alias)
        return {"alias": alias, "from": previous, "to": version, "moved": False, "forced": False}
    if alias == "production":
        took_production(cfg, version)
        clear_staging_of(cfg, version, who=reviewer, why=reason, decision="promote")
    return {"alias": alias, "from": previous, "to": version, "moved": True, "forced": forced}


def trusted(cfg: DictConfig, version: str, tags: dict) -> records.Evidence:
    """The version's trusted kind and gate decision; BadInput when its tags were edited in the UI."""
    proof = records.evidence(cfg, version, tags)
    if proof.tampered:
        raise BadInput(
            f"version {version}'s tags were edited outside detloop: {proof.explain()}",
            [
                f"the rules read the training run's params and the gate record (run {proof.run_id}, "
                f"{records.GATE_RECORD}), not the tags",
                f"put the tags back as the records say (detloop registry --repair {version}) or gate it again",
            ],
        )
    return proof


def previous_production(moves: list[dict], current: str) -> str | None:
    """Walk back: the version that held production before ``current`` got it through a non-rollback move.

    ``moves`` are the audit records of ``production`` that happened, oldest first. Rolling back twice
    goes further back (v3 -> v2 -> v1) because the move that gave v2 its production is the one before.
    """
    for move in reversed(moves):
        if move["decision"] in ("rollback", oversight.REVERT) or move.get("refused"):
            continue  # walking back never returns to where a rollback or a refused move came from
        if move["to_version"] == current:
            return move["from_version"] or None
    return None


def rollback(cfg: DictConfig, *, to: str | None = None, reviewer: str | None = None, reason: str | None = None) -> dict:
    """Give production back to the previous version (or ``to``); returns ``{alias, from, to, reviewer, reason}``.

    Recorded with decision ``rollback``; the rolled-back version is tagged ``rolled_back=true`` and
    stays registered. Refuses (BadInput, nothing changed) when there is no previous version.
    """
    name = cfg.mlflow.registered_model
    reviewer = (reviewer or "").strip() or registry.actor()
    reason = (reason or "").strip() or "rollback (no reason given)"
    oversight.watch(cfg)
    registry.reconcile(cfg, "production")
    current = registry.alias_holder(name, "production")
    if current is None:
        raise BadInput(f"no version of {name} holds 'production': nothing to roll back")
    moves = [
        m for m in registry.history(cfg) if m["alias"] == "production" and m["state"] == "done" and not m["refused"]
    ]
    if to is None:
        target = previous_production(moves, current)
        if target is None:
            raise BadInput(
                f"no previous production version before v{current} in the audit trail",
                ["name one with --to VERSION (a version that served before)"],
            )
        version_tags(cfg, target)  # it may have been deleted since
    else:
        target = str(to).strip()
        version_tags(cfg, target)  # refuses an unknown version
        if target == current:
            raise BadInput(f"version {target} already holds 'production': nothing to roll back")
        if target not in {m["to_version"] for m in moves}:
            raise BadInput(
                f"version {target} never held 'production': a rollback only returns to a version that served before",
                [f"to ship it, promote it: detloop promote {target} --reviewer NAME --reason TEXT"],
            )
    registry.move_alias(
        cfg,
        "production",
        target,
        why=reason,
        who=reviewer,
        decision="rollback",
        tags={"audit.rolled_back": current},
        expected=current,
    )
    registry.set_version_tags(name, current, {"rolled_back": "true"})
    took_production(cfg, target)
    return {"alias": "production", "from": current, "to": target, "reviewer": reviewer, "reason": reason}


def clear_staging_of(cfg: DictConfig, version: str, *, who: str | None, why: str, decision: str) -> None:
    """A version that went to production no longer waits in ``staging``."""
    if registry.alias_holder(cfg.mlflow.registered_model, "staging") == version:
        try:
            registry.clear_alias(
                cfg, "staging", why=f"v{version} took production: {why}", who=who, decision=decision, expected=version
            )
        except MoveConflict as err:  # someone else moves staging right now: theirs stands
            log.warning("staging left as it is: %s", err)


DECISIONS = ("pass", "review", "reject")


KINDS = ("finetune", "base")


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


def apply_decision(cfg: DictConfig, gate: GateDecision) -> dict:
    """Move the alias the decision gives the candidate (once); returns what was decided and moved."""
    name, version = gate.name, gate.version
    tags = version_tags(cfg, version)
    oversight.watch(cfg)
    recorded = trusted(cfg, version, tags).decision
    if recorded != gate.decision:
        raise BadInput(
            f"version {version}: the gate decision file says {gate.decision!r}, the gate record in its run says "
            f"{recorded!r}",
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
    why = f"gate {gate.decision}" + (f": {gate.summary.splitlines()[0]}" if gate.summary else "")
    numeric = {k: float(v) for k, v in gate.figures.items() if type(v) in (int, float) and ".per_class." not in k}
    previous = registry.move_alias(
        cfg,
        alias,
        version,
        why=why,
        decision=gate.decision,
        figures=numeric,
        tags={"audit.kind": gate.kind, "audit.stage": "promote"},  # the stage that acts on gate decisions
        expected=holder,
        # set right before the alias call (crash-safe), and only when the move goes ahead
        version_tags={"rollback_to": holder} if alias == "production" and holder else None,
    )
    if alias == "production":
        clear_staging_of(cfg, version, who=None, why=why, decision=gate.decision)
    return {**result, "from": previous, "to": version}
