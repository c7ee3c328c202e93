"""Stage ``promote``: act on the gate's decisions.

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

The rules (gate decision -> alias) and the human decisions ``detloop promote`` / ``detloop rollback``
live in :mod:`detloop.tracking.promotion`.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from detloop.core.config import config_hash
from detloop.core.errors import BadInput
from detloop.core.stage import hydra_entry, read_json, stage_dir, write_json
from detloop.tracking import runs
from detloop.tracking.promotion import apply_decision, parse_decision

log = logging.getLogger(__name__)

STAGE = "promote"
# the gate's decision files: candidate source -> file in build/gate/
DECISION_FILES = {"finetune": "decision.json", "retrain": "retrain.json"}


# --------------------------------------------------------------------------- the gate's decision


# --------------------------------------------------------------------------- registry helpers


# --------------------------------------------------------------------------- the stage


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
