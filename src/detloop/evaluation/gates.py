"""The three deployment gates as pure rules over measured figures (document section 4).

* Gate 1, regression: mAP50 drop on the anchor test split; < pass_below passes, > reject_above rejects.
* Gate 2, new samples: detection rate on the pool holdout; > pass_above passes, else human review.
* Gate 3, optional A/B: per-class AP50 on labelled production samples within a tolerance.

The decision: reject if any gate rejects, else review if any asks for it, else pass."""

from __future__ import annotations

import numpy as np
from omegaconf import DictConfig

from detloop.core.errors import BadInput

# the headline figures a gated version carries as tags (the rest are metrics and tags of its run)
TAG_FIGURES = (
    "gate.regression.drop",
    "gate.new_samples.detection_rate",
    "gate.ab.worst_drop",
)


def drop(cfg: DictConfig, reference: float, candidate: float) -> float:
    """mAP50 drop in points (absolute mode) or in % of the reference (relative mode); negative = better."""
    mode = str(cfg.gate.regression.mode)
    if mode == "absolute":
        return (reference - candidate) * 100.0
    if mode == "relative":
        return (reference - candidate) / reference * 100.0 if reference > 0 else 0.0
    raise BadInput(f"gate.regression.mode={mode!r} is not absolute or relative", ["conf/gate/default.yaml: mode"])


def regression_gate(cfg: DictConfig, cand: dict, ref: dict) -> dict:
    """Gate 1: mAP50 drop on the anchor test split."""
    g = cfg.gate.regression
    value = drop(cfg, ref["map50"], cand["map50"])
    decision = "pass" if value < float(g.pass_below) else "reject" if value > float(g.reject_above) else "review"
    unit = "points" if g.mode == "absolute" else "% of the reference"
    return {
        "decision": decision,
        "candidate_map50": cand["map50"],
        "reference_map50": ref["map50"],
        "drop": value,
        "mode": str(g.mode),
        "text": (
            f"Gate 1 (regression) {decision.upper()}: anchor-test mAP50 {ref['map50']:.3f} -> {cand['map50']:.3f} "
            f"(drop {value:.2f} {unit}; pass < {g.pass_below}, reject > {g.reject_above}; "
            f"{cand['images']} images, {cand['objects']} objects)."
        ),
    }


def new_samples_gate(cfg: DictConfig, cand: dict, ref: dict, trained: dict) -> dict:
    """Gate 2: detection rate on the pool holdout at the serving confidence."""
    threshold = float(cfg.gate.new_samples.pass_above)
    if not cand.get("objects"):
        return {
            "decision": "review",
            "text": "Gate 2 (new samples) REVIEW: the pool holdout is empty; "
            "nothing shows the candidate fixes the reported failures.",
        }
    rate = cand["detection_rate"]
    decision = "pass" if rate > threshold else "review"
    text = (
        f"Gate 2 (new samples) {decision.upper()}: the candidate finds {rate:.1%} of the {cand['objects']} "
        f"objects in {cand['images']} held-out reported failures (reference {ref['detection_rate']:.1%}; "
        f"pass > {threshold:.0%})."
    )
    if decision != "pass":
        weak = sorted(cand["detection_rate_per_class"].items(), key=lambda kv: kv[1])[:3]
        weakest = ", ".join(f"{k} {v:.0%}" for k, v in weak)
        text += f" The fine-tune did not learn the new failures well enough (weakest: {weakest}). " + next_step(cfg)
    return {
        "decision": decision,
        "pass_above": threshold,
        "detection_rate": rate,
        "reference_detection_rate": ref["detection_rate"],
        "detection_rate_any_class": cand["detection_rate_any_class"],
        "per_class": cand["detection_rate_per_class"],
        "trained_on_detection_rate": trained.get("detection_rate"),
        "text": text,
    }


def next_step(cfg: DictConfig) -> str:
    """What follows a Gate 2 failure (the guide: "check label quality or increase training")."""
    from detloop.evaluation import recipes

    text = "Check the labels of these samples (the label check below). "
    if str(cfg.search.mode) == "run":
        return text + (
            f"The recipe search (stage `search`) now tries {int(cfg.search.trials)} stronger recipe(s) from the "
            "base, each gated, and stages the best passing one for a human to promote."
        )
    try:
        recipe = " ".join(f"{k}={v}" for k, v in recipes.next_recipe(cfg).items())
    except BadInput as err:
        return text + f"The next recipe cannot be named: {err}."
    return text + (
        f"Next recipe to try: `python -m detloop.finetune {recipe}`; or let the recipe search run "
        "(search.mode=run) and promote the best passing version."
    )


def ab_gate(cfg: DictConfig, cand: dict, ref: dict) -> dict:
    """Gate 3: no class worse than the reference by more than the tolerance (per-class AP50)."""
    tol = float(cfg.gate.ab.tolerance)
    drops = {k: ref["ap50"][k] - cand["ap50"].get(k, 0.0) for k in ref["ap50"]}
    worse = {k: d for k, d in drops.items() if d > tol}
    decision = str(cfg.gate.ab.on_fail) if worse else "pass"
    if decision not in ("review", "reject", "pass"):
        raise BadInput(f"gate.ab.on_fail={decision!r} is not review or reject", ["conf/gate/default.yaml: ab.on_fail"])
    worst = max(drops.values(), default=0.0)
    listed = ", ".join(f"{k} -{d:.3f}" for k, d in sorted(worse.items(), key=lambda kv: -kv[1]))
    return {
        "decision": decision,
        "worst_drop": worst,
        "per_class_drop": drops,
        "text": (
            f"Gate 3 (A/B) {decision.upper()}: {cand['images']} production samples; "
            + (f"worse beyond {tol}: {listed}." if worse else f"no class worse by more than {tol} AP50.")
        ),
    }


def served_gate(cfg: DictConfig, cand: dict, served: dict | None, runtime: str) -> dict:
    """What is gated is what is served: the version's served runtime (its ONNX export) measured on the
    Gate 1 and Gate 2 sets must give the gated figures within ``gate.served.max_gap`` points."""
    if served is None:
        return {
            "decision": "pass",
            "runtime": runtime,
            "text": f"Served model: {runtime}, the weights gated above.",
        }
    max_gap = float(cfg.gate.served.max_gap)
    pairs = {"map50": ("anchor_test", "map50"), "detection_rate": ("pool_holdout", "detection_rate")}
    out: dict = {"runtime": runtime}
    gaps = {}
    for name, (key, figure) in pairs.items():
        if not served.get(key, {}).get("objects"):
            continue
        out[f"served_{name}"] = served[key][figure]
        gaps[name] = abs(served[key][figure] - cand[key][figure]) * 100.0
        out[f"{name}_gap"] = gaps[name]
    worst = max(gaps.values(), default=0.0)
    decision = "pass" if worst <= max_gap else str(cfg.gate.served.on_fail)
    if decision not in ("review", "reject", "pass"):
        raise BadInput(f"gate.served.on_fail={decision!r} is not review or reject", ["conf/gate/default.yaml"])
    listed = ", ".join(f"{k} {out[f'served_{k}']:.4f} ({gaps[k]:.2f} points)" for k in gaps)
    out["decision"] = decision
    out["text"] = f"Served model ({runtime}) {decision.upper()}: {listed}; largest gap allowed {max_gap} points."
    return out


def combine(gates: dict[str, dict]) -> str:
    decisions = [g["decision"] for g in gates.values()]
    return "reject" if "reject" in decisions else "review" if "review" in decisions else "pass"


def figures(gates: dict, cand: dict, ref: dict) -> dict[str, float]:
    """The gate's numbers as flat ``gate.*`` keys (MLflow metrics, version tags, DVC metrics)."""
    reg, new = gates["regression"], gates["new_samples"]
    out = {
        "gate.regression.drop": reg["drop"],
        "gate.regression.candidate_map50": reg["candidate_map50"],
        "gate.regression.reference_map50": reg["reference_map50"],
        "gate.anchor_test.candidate_map50_95": cand["anchor_test"]["map50_95"],
        "gate.anchor_test.reference_map50_95": ref["anchor_test"]["map50_95"],
    }
    if "detection_rate" in new:
        out.update(
            {
                "gate.new_samples.detection_rate": new["detection_rate"],
                "gate.new_samples.reference_detection_rate": new["reference_detection_rate"],
                "gate.new_samples.detection_rate_any_class": new["detection_rate_any_class"],
            }
        )
        out.update({f"gate.new_samples.per_class.{k}": v for k, v in new["per_class"].items()})
    if new.get("trained_on_detection_rate") is not None:
        out["gate.trained_on.detection_rate"] = new["trained_on_detection_rate"]
    if "ab" in gates:
        out["gate.ab.worst_drop"] = gates["ab"]["worst_drop"]
    served = gates.get("served", {})
    kept = ("served_map50", "served_detection_rate", "map50_gap", "detection_rate_gap")
    out.update({f"gate.served.{k}": served[k] for k in kept if k in served})
    return {k: float(v) for k, v in out.items() if v is not None and np.isfinite(v)}


def summary(candidate: str, reference: str, alias: str, decision: str, gates: dict) -> str:
    action = {
        "pass": f"promote: v{candidate} takes '{alias}' (v{reference} stays registered for rollback)",
        "review": f"human review: v{candidate} takes 'staging' and waits for `detloop promote {candidate}`",
        "reject": f"do not deploy: v{candidate} is tagged rejected; '{alias}' stays on v{reference}",
    }[decision]
    lines = [f"v{candidate} vs v{reference} (holds '{alias}'): {decision.upper()} -> {action}."]
    lines += [g["text"] for g in gates.values()]
    return "\n".join(lines)
