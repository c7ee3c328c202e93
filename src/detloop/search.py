"""Stage ``search``: when the fine-tune candidate did not pass Gate 2, search for a recipe that does.

Runs after ``promote``. Reads ``build/gate/decision.json``; when Gate 2 did not pass it acts on
``search.mode`` (``conf/search``):

* ``run``: a gated Optuna sweep of the fine-tune (:mod:`detloop.training.search`), ``search.trials`` trials
  within ``search.space``, each from the ``base`` alias with replay, gated against production. The best
  trial that passes every gate takes ``staging`` (one recorded alias move); a human still promotes it.
  The report (``search/report.md``, ``search/trials.png``) goes to the sweep's parent run and the staged
  trial's run;
* ``suggest``: no trials; ``build/search/report.md`` names the next recipe to try and the sweep command;
* ``off``: nothing.

Outputs: ``build/search/result.json`` (what was searched and staged), ``build/search/metrics.json`` (DVC
metrics) and ``build/search/lineage.json`` (the DVC output: the inputs the search depends on).
"""

from __future__ import annotations

import json
import logging

from omegaconf import DictConfig

from detloop.core.config import config_hash
from detloop.core.stage import hydra_entry, stage_dir, write_json
from detloop.data.manifest import sha256_file
from detloop.evaluation import recipes

log = logging.getLogger(__name__)

STAGE = "search"


def lineage_key(cfg: DictConfig) -> dict:
    gate = stage_dir(cfg, "gate") / "lineage.json"
    return {
        "stage": STAGE,
        "config_hash": config_hash(cfg.search),
        "finetune_config_hash": config_hash(cfg.finetune),
        "gate_lineage_sha256": sha256_file(gate) if gate.is_file() else "",
    }


def run(cfg: DictConfig) -> dict:
    """Search when Gate 2 did not pass (``search.mode``); otherwise record why not (MLflow is not touched)."""
    out = stage_dir(cfg, STAGE)
    mode = recipes.check_mode(cfg)
    decision = stage_dir(cfg, "gate") / "decision.json"
    record = json.loads(decision.read_text()) if decision.is_file() else {"skipped": True, "reason": f"no {decision}"}
    due, why = recipes.due(record)
    result: dict = {"mode": mode, "due": due, "why": why, "searched": False}
    for stale in ("report.md", "trials.png", "trials.json"):  # an earlier search's report is not this one's
        (out / stale).unlink(missing_ok=True)
    if due and mode != "off":
        from detloop.training import search  # MLflow and the sweep: only when there is something to search

        result.update(
            next_recipe=recipes.next_recipe(cfg),
            command=recipes.sweep_command(cfg),
            guide=search.guide_row(record, cfg),
        )
    if not due or mode == "off":
        log.info("recipe search: %s%s", why, " (search.mode=off)" if due else "")
    elif mode == "suggest":
        text = suggestion(result)
        (out / "report.md").write_text(text)
        log.info("%s", text)
    else:
        result.update(searched=True, **search.search_and_stage(cfg, record, out / "recipe-search", _overrides()))
    write_json(out / "result.json", result)
    write_json(out / "metrics.json", _metrics(result))
    write_json(out / "lineage.json", lineage_key(cfg))
    return result


def suggestion(result: dict) -> str:
    recipe = ", ".join(f"{k}={v}" for k, v in result["next_recipe"].items())
    return (
        f"Recipe search (search.mode=suggest): {result['why']}.\n"
        f"Next recipe to try: {recipe}\n"
        f"  python -m detloop.finetune {' '.join(f'{k}={v}' for k, v in result['next_recipe'].items())}\n"
        f"Or search the configured space (search.space, search.trials):\n  {result['command']}\n"
    )


def _metrics(result: dict) -> dict:
    if not result.get("searched"):
        return {"searched": False}
    staged = result.get("staged") or {}
    return {
        "searched": True,
        "trials": result["trials_run"],
        "passing": result["passing"],
        "best_version": staged.get("version"),
        "best_detection_rate": staged.get("detection_rate"),
        "best_drop": staged.get("drop"),
    }


def _overrides() -> list[str]:
    """This stage's own command-line overrides, handed to the trials."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


main = hydra_entry(run)

if __name__ == "__main__":
    main()
