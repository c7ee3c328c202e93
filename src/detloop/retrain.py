"""Stage ``retrain``: a new base from scratch on anchor + pool, when the pool has grown enough.

"When fine-tune pool reaches 2000+ samples: base_v2 (original data + all accumulated samples, trained
from scratch)" (document sections 2 and 6). The mix stage decides whether a retrain is due
(``build/mix/retrain.json``: constant while it is not, so ordinary pool additions do not rerun this
stage). When due, the base recipe (``conf/retrain`` = ``conf/base`` unless overridden) trains on anchor
train + every pool train sample and validates on anchor val + pool val; pool holdout samples (Gate 2's)
and the anchor test split are never used. The result is registered as a candidate (``kind=base``,
``retrain=true``) and moves no alias: it takes ``base`` only through the gates (regression on the
anchor test split), and later fine-tunes then start from it.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from detloop.core.stage import hydra_entry, read_json, stage_dir, write_json

log = logging.getLogger(__name__)

STAGE = "retrain"


def run(cfg: DictConfig) -> dict:
    """Retrain the base when ``build/mix/retrain.json`` says it is due; otherwise record the wait."""
    out = stage_dir(cfg, STAGE)
    due = read_json(stage_dir(cfg, "mix") / "retrain.json", "the retrain check (stage mix)")
    if not due.get("due"):
        message = f"no base retrain: fewer than {due.get('threshold')} new verified samples since the newest base"
        log.info("%s", message)
        write_json(out / "model.json", {"skipped": True, "reason": message})
        write_json(out / "metrics.json", {"skipped": True})  # a DVC metric: present whether or not it trained
        write_json(out / "lineage.json", {"stage": STAGE, "skipped": True, "input": due})
        return {"skipped": True, "reason": message}
    from detloop.training.retrain import retrain_base  # MLflow and Ultralytics: only when a retrain is due

    return retrain_base(cfg, due, out)


main = hydra_entry(run)

if __name__ == "__main__":
    main()
