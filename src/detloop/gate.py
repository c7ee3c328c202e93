"""Stage ``gate``: is the candidate safe to ship? (document section 4).

The candidate and its reference are evaluated on the same sets by the same evaluator (one
prediction pass per model and set, ``detloop.evaluation.evaluator``):

* Gate 1, regression: mAP50 on the anchor test split. A drop below ``gate.regression.pass_below``
  points passes, above ``reject_above`` rejects, in between goes to human review.
* Gate 2, new samples: detection rate on the pool holdout (reported failures never trained on) at
  the serving confidence; above ``gate.new_samples.pass_above`` passes, else human review. Reported
  per class, ignoring class (diagnostic) and on the trained-on pool samples, each labelled as such.
* Gate 3, optional A/B: per-class AP50 on labelled production samples; no class may be worse than
  the reference by more than ``gate.ab.tolerance``.

The decision (reject if any gate rejects, else review if any asks for it, else pass) is written to
``build/gate/decision.json`` (the fine-tune candidate) and ``build/gate/retrain.json`` (a retrained
base), as DVC metrics (``build/gate/metrics.json``), as MLflow metrics, tags and a report
(``gate/report.md``, ``gate/per_class.png``) on the candidate's run, and as version tags. The gate
moves no alias: the ``promote`` stage acts on the decision.

Fine-tunes are compared with the version holding ``production``; a retrained base with the version
holding ``base`` (it would replace it as every fine-tune's starting point).
"""

from __future__ import annotations

import json
import logging

from omegaconf import DictConfig

from detloop.core.config import config_hash, resolve_path
from detloop.core.stage import hydra_entry, stage_dir, write_json
from detloop.data.manifest import MANIFEST, manifest_hash, sha256_file
from detloop.evaluation.gating import gate_version, jsonable

log = logging.getLogger(__name__)

STAGE = "gate"
# candidate source stage -> (decision file, alias it is compared with)
SOURCES = {"finetune": ("decision.json", "production"), "retrain": ("retrain.json", "base")}
# the figures also kept as version tags (the registry page shows tags; every figure is a run metric)


# --------------------------------------------------------------------------- evaluation sets


# --------------------------------------------------------------------------- the gates


# --------------------------------------------------------------------------- one candidate


# --------------------------------------------------------------------------- the stage


def lineage_key(cfg: DictConfig) -> dict:
    """The DVC output: what the gate's decisions depend on (same on every machine for the same inputs)."""
    build = resolve_path(cfg, "build")
    keys = {src: build / src / "lineage.json" for src in SOURCES}
    return {
        "stage": STAGE,
        "config_hash": config_hash(cfg.gate),
        "evaluate_config_hash": config_hash(cfg.evaluate),  # how both models predict
        **{f"{src}_lineage_sha256": sha256_file(p) if p.is_file() else "" for src, p in keys.items()},
        "anchor_manifest_sha256": manifest_hash(resolve_path(cfg, "anchor") / MANIFEST),
        "pool_manifest_sha256": manifest_hash(resolve_path(cfg, "pool") / MANIFEST),
    }


def run(cfg: DictConfig) -> dict:
    """Gate the fine-tune candidate and a retrained base, when the stages before produced them."""
    out = stage_dir(cfg, STAGE)
    metrics, results = {}, {}
    for source, (filename, alias) in SOURCES.items():
        model = resolve_path(cfg, "build") / source / "model.json"
        found = json.loads(model.read_text()) if model.is_file() else {"skipped": True, "reason": f"no {model}"}
        if found.get("skipped"):
            record = {"skipped": True, "reason": f"{source}: {found.get('reason') or found.get('trigger')}"}
        else:
            record = gate_version(cfg, str(found["version"]), alias=alias)
            metrics[source] = {
                "decision": record["decision"],
                "version": record["candidate"]["version"],
                **record["figures"],
            }
        write_json(out / filename, jsonable(record))
        results[source] = record
    write_json(out / "metrics.json", metrics)
    write_json(out / "lineage.json", lineage_key(cfg))
    return {"decisions": {k: v.get("decision", "skipped") for k, v in results.items()}}


main = hydra_entry(run)

if __name__ == "__main__":
    main()
