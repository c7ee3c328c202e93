"""Stage ``mix``: the fine-tune data set, by the document's replay rules.

Every pool train sample plus a random replay sample of anchor train, sized by the ratio table
(``conf/mix``: fewer new samples need more old data; 5x from 500 on) and capped at ``max_old``.
Pool holdout samples (Gate 2's) and the anchor test split never enter training or validation.
Validation (checkpoint selection) is anchor val plus the pool's val slice, so the selected
checkpoint is one that learned the new samples without losing the old ones.

Whether to fine-tune at all is the trigger policy's (``conf/trigger``, :func:`detloop.data.pool.trigger_status`):
an enabled strategy (volume, schedule, performance) is due and the pool holds at least
``trigger.min_train_samples`` new train samples, or ``trigger.force=true``. The stage reads
``build/trigger/state.json`` (stage ``trigger``) only as a DVC dependency: it reruns when a schedule
period begins or the monitor raises a flag, and then decides from the registry and the pool as always.

Outputs image-path lists (relative to the project root, so they are identical on every machine)
and ``mix.json`` with the counts, multiplier, seed and the trigger decision. It also decides whether a
base retrain from scratch is due (``retrain.json``, the ``retrain`` stage's input).
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from detloop.core.env import project_root
from detloop.core.stage import hydra_entry, stage_dir, write_json
from detloop.data import pool
from detloop.data.mixing import build_mix, relative_paths, retrain_key
from detloop.tracking import versions

log = logging.getLogger(__name__)

STAGE = "mix"


def run(cfg: DictConfig) -> dict:
    """Write ``build/mix/{train,val}.txt`` and ``mix.json``; an untriggered pool writes empty lists."""
    pool.check_reviewed(cfg)  # never train on unreviewed samples
    registered = versions.model_versions(cfg)  # one read of the registry for both checks
    trigger = pool.trigger_status(cfg, versions.last_finetune(cfg, registered))
    out = stage_dir(cfg, STAGE)
    root = project_root()
    if trigger.triggered:
        mix = build_mix(cfg, trigger)
        record = {**mix["record"], **decision(trigger)}
        train, val = relative_paths(mix["train"], root), relative_paths(mix["val"], root)
        log.info(
            "mix: %d new + %d replayed anchor samples (%dx), %d val; %s",
            record["new_train"],
            record["old_train"],
            record["multiplier"],
            len(val),
            trigger.message,
        )
    else:
        record = {
            "triggered": False,
            "forced": False,
            "trigger": trigger.message,
            "trigger_reasons": list(trigger.reasons),
            "pool_size": trigger.pool_size,
            "new_samples": trigger.new_samples,
            **decision(trigger),
        }
        train, val = [], []
        log.info("no fine-tune: %s", trigger.message)
    (out / "train.txt").write_text("".join(f"{p}\n" for p in train))
    (out / "val.txt").write_text("".join(f"{p}\n" for p in val))
    retrain = pool.retrain_status(cfg, versions.last_base(cfg, registered))
    record["retrain"] = retrain["message"]
    write_json(out / "mix.json", record)
    write_json(out / "retrain.json", retrain_key(cfg, retrain))
    log.info("%s", retrain["message"])
    return record


def decision(trigger: pool.TriggerStatus) -> dict:
    """The trigger figures ``mix.json`` records beside the mix (scalars: they become MLflow params)."""
    return {
        "new_train_samples": trigger.new_train_samples,
        "min_train_samples": trigger.min_train_samples,
        "triggered_by": ",".join(name for name, on in trigger.triggers.items() if on),
    }


main = hydra_entry(run)

if __name__ == "__main__":
    main()
