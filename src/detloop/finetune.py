"""Stage ``finetune``: fine-tune the base model on the mix and register the result as a candidate.

Always starts from the registry's ``base`` alias (or a pinned ``finetune.base_version``) and refuses
a fine-tuned starting point: chained fine-tunes drift (document section 2). Registers a new version
tagged ``kind=finetune`` and ``base_version=N``; it moves no alias — promotion is the gates' job.
When the mix stage found no trigger, this stage records the wait and trains nothing. In a Hydra sweep
(``-m``) every job's version is gated right away (``detloop.gate``), so the best passing one can be promoted;
otherwise the gate's prediction passes are made here and kept for the ``gate`` stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path

from omegaconf import DictConfig

from detloop.core.config import config_hash, resolve_path
from detloop.core.env import project_root
from detloop.core.stage import hydra_entry, job_dir, read_json, stage_dir, write_json
from detloop.data import pool
from detloop.data.datasets import anchor_names, write_data_yaml
from detloop.data.manifest import sha256_file
from detloop.data.mixing import reweight
from detloop.evaluation import gating, label_check
from detloop.model.pyfunc import model_weights
from detloop.model.yolo import ultralytics
from detloop.tracking import registry, runs
from detloop.training.trainer import starting_version, train_and_register

log = logging.getLogger(__name__)

STAGE = "finetune"


def mix_yaml(cfg: DictConfig, out: Path, mix: dict) -> tuple[Path, dict]:
    """An Ultralytics data yaml over the mix lists, with absolute image paths (written for this run), the
    train list as ``finetune.replay`` uses it (:func:`detloop.data.mixing.reweight`); returns it and the counts."""
    root = project_root()
    mix_dir = stage_dir(cfg, "mix")
    lines = {}
    for split in ("train", "val"):
        lines[split] = [ln for ln in (mix_dir / f"{split}.txt").read_text().splitlines() if ln.strip()]
    r = cfg.finetune.replay
    used = reweight(lines["train"], resolve_path(cfg, "pool"), root, r.scale, r.pool_repeat, int(mix["seed"]))
    splits = {"train": [root / ln for ln in used.pop("train")], "val": [root / ln for ln in lines["val"]]}
    return write_data_yaml(out, anchor_names(resolve_path(cfg, "anchor")), splits), used


def lineage_key(cfg: DictConfig, mix_record: dict) -> dict:
    base_key = stage_dir(cfg, "base") / "lineage.json"
    return {
        "stage": STAGE,
        "config_hash": config_hash(cfg.finetune),
        "mix_sha256": _json_sha256(mix_record),
        "base_lineage_sha256": sha256_file(base_key) if base_key.is_file() else "",
    }


def _json_sha256(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def run(cfg: DictConfig) -> dict:
    """Fine-tune when the mix is triggered; otherwise record the wait. Returns the registry coordinates."""
    # a sweep's job (a recipe-search trial) writes into its own job folder, never over the stage's DVC outputs
    out = job_dir() or stage_dir(cfg, STAGE)
    mix = read_json(stage_dir(cfg, "mix") / "mix.json", "the mix (stage mix)")
    if not mix.get("triggered"):
        log.info("no fine-tune: %s", mix.get("trigger"))
        write_json(out / "model.json", {"skipped": True, "trigger": mix.get("trigger")})
        write_json(out / "metrics.json", {"skipped": True})  # a DVC metric: present whether or not it trained
        write_json(out / "lineage.json", {"stage": STAGE, "skipped": mix.get("trigger")})
        return {"skipped": True, "trigger": mix.get("trigger")}
    experiment_id = runs.setup(cfg)  # an unreachable store fails here, before any work
    base_version = starting_version(cfg)
    name = cfg.mlflow.registered_model
    data_yaml, used = mix_yaml(cfg, out, mix)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        weights, _ = model_weights(f"models:/{name}/{base_version}", Path(tmp))
        label_check.before_training(cfg, weights, out, base_version)  # the base's view of the pool labels
        trained = train_and_register(
            cfg,
            ultralytics().YOLO(str(weights)),
            cfg.finetune,
            STAGE,
            data_yaml,
            experiment_id=experiment_id,
            run_name=f"finetune from v{base_version}",
            params={
                **{f"mixed.{k}": v for k, v in mix.items() if k not in ("ratios", "trigger_reasons")},
                "trained.replay_pages": used["replay_kept"],
                "trained.pool_pages_per_epoch": used["pool"] * int(cfg.finetune.replay.pool_repeat),
            },
            param_groups=["finetune", "mix"],
            tags={"base_version": base_version, "forced": str(mix["forced"]).lower()},
            artifacts={"mix": stage_dir(cfg, "mix")},
        )
    version, run_id, final = trained["version"], trained["run_id"], trained["final"]
    _tag(cfg, version, run_id, base_version, {**mix, **used})
    flagged = None if runs.sweep_dir() is not None else pool.consume_performance_flag(cfg, version)
    if flagged is not None:  # the monitor's performance flag is answered by this candidate
        registry.set_version_tags(name, version, {"trigger.performance_flag": flagged})
        log.info("performance flag answered by v%s: %s", version, flagged)
    result = {
        "name": name,
        "version": version,
        "run_id": run_id,
        "base_version": base_version,
        "model_uri": f"models:/{name}/{version}",
        "forced": mix["forced"],
    }
    write_json(out / "model.json", result)
    write_json(out / "metrics.json", final)
    write_json(out / "lineage.json", lineage_key(cfg, mix))
    log.info("registered %s version %s, fine-tuned from base v%s (run %s)", name, version, base_version, run_id)
    if runs.sweep_dir() is not None:  # every job of a sweep is gated (the recipe search's objective)
        from detloop.evaluation.recipes import objective

        record = gating.gate_version(cfg, version, alias="production")
        score = objective(record)
        write_json(out / "trial.json", {**result, "decision": record["decision"], "objective": score})
        return {
            **result,
            "metrics": final,
            "decision": record["decision"],
            "figures": record["figures"],
            "objective": score,
        }
    # the gate's prediction passes, made here where torch and Ultralytics are loaded already: the gate stage
    # reads them from the prediction cache
    gating.predict_ahead(cfg, version, out)
    return {**result, "metrics": final}


def _tag(cfg: DictConfig, version: str, run_id: str, base_version: str, mix: dict) -> None:
    tags = {"kind": "finetune"}  # first: the MLflow UI lists a version's tags in the order they were set
    tags.update({k: v for k, v in runs.lineage_tags(cfg, STAGE).items() if k != "stage"})
    tags.update(
        {
            "kind": "finetune",
            "base_version": base_version,
            "run_id": run_id,
            "pool.size": mix["pool_size"],
            "pool.manifest_sha256": mix["pool_manifest_sha256"],
            **({"forced": "true"} if mix["forced"] else {}),
        }
    )  # the mix's other figures are the run's params (mixed.*)
    registry.set_version_tags(cfg.mlflow.registered_model, version, tags)
    t, r = cfg.finetune.train, cfg.finetune.replay
    repeat = f" (x{r.pool_repeat})" if int(r.pool_repeat) > 1 else ""
    kept = f" ({mix['multiplier']}x)" if mix["replay_kept"] == mix["old_train"] else f" (of {mix['old_train']} drawn)"
    registry.describe(
        cfg,
        version,
        f"fine-tune of base v{base_version}: {mix['new_train']} pool samples{repeat} + {mix['replay_kept']} replayed "
        f"anchor samples{kept}, {t.epochs} epochs, lr0 {t.lr0}, freeze {t.freeze}, imgsz {t.imgsz}"
        f"{' (forced)' if mix['forced'] else ''}; run {run_id}. Awaiting the gates.",
    )


main = hydra_entry(run)

if __name__ == "__main__":
    main()
