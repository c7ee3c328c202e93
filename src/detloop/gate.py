"""Stage ``gate``: is the candidate safe to ship? (document section 4).

The candidate and its reference are evaluated on the same sets by the same evaluator (one
prediction pass per model and set, ``detloop.evaluator``):

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
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import numpy as np
from mlflow.entities import Metric
from omegaconf import DictConfig

from detloop import evaluator, pool, registry, tracking
from detloop.config import config_hash, resolve_path
from detloop.errors import BadInput
from detloop.evaluate import model_weights
from detloop.manifest import manifest_hash, sha256_file
from detloop.mix import anchor_images
from detloop.stage import anchor_names, hydra_entry, stage_dir, write_json
from detloop.yolo_format import is_image_name

log = logging.getLogger(__name__)

STAGE = "gate"
# candidate source stage -> (decision file, alias it is compared with)
SOURCES = {"finetune": ("decision.json", "production"), "retrain": ("retrain.json", "base")}
# the figures also kept as version tags (the registry page shows tags; every figure is a run metric)
TAG_FIGURES = ("gate.regression.drop", "gate.regression.candidate_map50", "gate.new_samples.detection_rate",
               "gate.ab.worst_drop")  # fmt: skip
SWEEP_HINT = "python -m detloop.finetune -m finetune.train.lr0=0.001,0.01 finetune.train.freeze=0,10"


# --------------------------------------------------------------------------- evaluation sets


def gate_sets(cfg: DictConfig) -> dict[str, list[Path]]:
    """The sets both models are measured on: anchor test, pool holdout, pool train, A/B sample (if on)."""
    anchor = resolve_path(cfg, "anchor")
    sets = {
        "anchor_test": anchor_images(anchor, "test"),
        "pool_holdout": pool.pool_samples(cfg, "holdout"),
        "pool_trained_on": pool.pool_samples(cfg, "train"),
    }
    if not sets["anchor_test"]:
        raise BadInput("no anchor test split to gate on", [f"{anchor / 'images' / 'test'}: no images"])
    if cfg.gate.ab.data:
        sets["ab"] = ab_sample(cfg)
    return sets


def ab_sample(cfg: DictConfig) -> list[Path]:
    """``gate.ab.size`` labelled production images drawn with ``gate.ab.seed`` from ``gate.ab.data``."""
    folder = Path(str(cfg.gate.ab.data)).expanduser()
    images = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_name(p)) if folder.is_dir() else []
    if not images:
        raise BadInput("gate.ab.data holds no images", [f"{folder}: not a folder of labelled production images"])
    unlabelled = [p for p in images if not evaluator.label_path(p).is_file()]
    if unlabelled:
        raise BadInput(f"gate.ab.data: {len(unlabelled)} image(s) without labels",
                       [f"{p}: no label file {evaluator.label_path(p)}" for p in unlabelled[:20]])  # fmt: skip
    size = min(int(cfg.gate.ab.size), len(images))
    picks = np.random.default_rng(int(cfg.gate.ab.seed)).choice(len(images), size=size, replace=False)
    return [images[i] for i in sorted(picks.tolist())]


def measure(cfg: DictConfig, weights: Path, imgsz: int, images: list[Path], names: dict[int, str]) -> dict:
    """AP (COCO-style) and detection rates of one model on one set, from one prediction pass."""
    if not images:
        return {"images": 0, "objects": 0}
    ev = cfg.gate.eval
    gts = evaluator.load_ground_truth(images, num_classes=max(names) + 1)
    started = time.perf_counter()
    dets = evaluator.predict(weights, images, imgsz=imgsz, batch=int(ev.batch), device=ev.device,
                             conf=float(ev.conf), iou=float(ev.iou), max_det=int(ev.max_det))  # fmt: skip
    inference_s = time.perf_counter() - started
    found = evaluator.evaluate_predictions(gts, dets, names, serving_conf=float(cfg.gate.new_samples.conf),
                                           match_iou=float(cfg.gate.new_samples.iou))  # fmt: skip
    return {
        "images": found["images"],
        "objects": found["objects"],
        "map50": found["map50"],
        "map50_95": found["map50_95"],
        "ap50": {k: v["ap50"] for k, v in found["per_class"].items() if v["n_gt"] > 0},
        "detection_rate": found["detection_rate"]["rate"],
        "detection_rate_any_class": found["detection_rate_any_class"]["rate"],
        "detection_rate_per_class": {  # in class-id order, like ap50
            name: found["detection_rate"]["per_class"][name]["rate"]
            for name in names.values()
            if name in found["detection_rate"]["per_class"]
        },
        "timings": {"inference_s": inference_s, "metrics_s": found["timings"]["metrics_s"]},
    }


# --------------------------------------------------------------------------- the gates


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
        "text": (f"Gate 1 (regression) {decision.upper()}: anchor-test mAP50 {ref['map50']:.3f} -> {cand['map50']:.3f} "
                 f"(drop {value:.2f} {unit}; pass < {g.pass_below}, reject > {g.reject_above}; "
                 f"{cand['images']} images, {cand['objects']} objects)."),
    }  # fmt: skip


def new_samples_gate(cfg: DictConfig, cand: dict, ref: dict, trained: dict) -> dict:
    """Gate 2: detection rate on the pool holdout at the serving confidence."""
    threshold = float(cfg.gate.new_samples.pass_above)
    if not cand.get("objects"):
        return {"decision": "review", "text": "Gate 2 (new samples) REVIEW: the pool holdout is empty; "
                "nothing shows the candidate fixes the reported failures."}  # fmt: skip
    rate = cand["detection_rate"]
    decision = "pass" if rate > threshold else "review"
    text = (f"Gate 2 (new samples) {decision.upper()}: the candidate finds {rate:.1%} of the {cand['objects']} "
            f"objects in {cand['images']} held-out reported failures (reference {ref['detection_rate']:.1%}; "
            f"pass > {threshold:.0%}).")  # fmt: skip
    if decision != "pass":
        weak = sorted(cand["detection_rate_per_class"].items(), key=lambda kv: kv[1])[:3]
        weakest = ", ".join(f"{k} {v:.0%}" for k, v in weak)
        text += (f" The fine-tune did not learn the new failures well enough (weakest: {weakest}). Check the "
                 f"labels of these samples, or try a stronger recipe with a sweep, e.g. `{SWEEP_HINT}`, and "
                 "promote the best passing version.")  # fmt: skip
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
        "text": (f"Gate 3 (A/B) {decision.upper()}: {cand['images']} production samples; "
                 + (f"worse beyond {tol}: {listed}." if worse else f"no class worse by more than {tol} AP50.")),
    }  # fmt: skip


def combine(gates: dict[str, dict]) -> str:
    decisions = [g["decision"] for g in gates.values()]
    return "reject" if "reject" in decisions else "review" if "review" in decisions else "pass"


# --------------------------------------------------------------------------- one candidate


def reference_version(cfg: DictConfig, candidate: str, alias: str) -> str:
    """The version to compare with: the alias holder (or, if that is the candidate, its rollback target)."""
    name = cfg.mlflow.registered_model
    holder = registry.alias_holder(name, alias)
    if holder == candidate:
        holder = registry.client().get_model_version(name, candidate).tags.get("rollback_to") or None
    if holder is None:
        raise BadInput(f"nothing to compare v{candidate} with: no other version holds '{alias}'",
                       ["run the base stage first (dvc repro base)"])  # fmt: skip
    return holder


def gate_version(cfg: DictConfig, candidate: str, *, alias: str = "production") -> dict:
    """Evaluate ``candidate`` against the ``alias`` holder, decide, and record the decision in MLflow."""
    tracking.setup(cfg)
    name = cfg.mlflow.registered_model
    reference = reference_version(cfg, candidate, alias)
    names = anchor_names(resolve_path(cfg, "anchor"))
    sets = gate_sets(cfg)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(dir=stage_dir(cfg, STAGE)) as tmp:
        for role, version in (("candidate", candidate), ("reference", reference)):
            weights, config = model_weights(f"models:/{name}/{version}", Path(tmp) / role)
            imgsz = int(config.get("imgsz", 640))
            results[role] = {key: measure(cfg, weights, imgsz, images, names) for key, images in sets.items()}
    cand, ref = results["candidate"], results["reference"]
    gates = {
        "regression": regression_gate(cfg, cand["anchor_test"], ref["anchor_test"]),
        "new_samples": new_samples_gate(cfg, cand["pool_holdout"], ref["pool_holdout"], cand["pool_trained_on"]),
    }
    if "ab" in sets:
        gates["ab"] = ab_gate(cfg, cand["ab"], ref["ab"])
    decision = combine(gates)
    mv = registry.client().get_model_version(name, candidate)
    record = {
        "skipped": False,
        "decision": decision,
        "candidate": {"name": name, "version": candidate, "kind": mv.tags.get("kind", ""), "run_id": mv.run_id},
        "production": {"version": reference, "alias": alias},
        "gates": gates,
        "figures": figures(gates, cand, ref),
        "sets": {key: {"images": cand[key]["images"], "objects": cand[key]["objects"]} for key in sets},
        "summary": summary(candidate, reference, alias, decision, gates),
        "measured": {"candidate": cand, "reference": ref},
    }
    _record(cfg, record)
    log.info("%s", record["summary"])
    return record


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
        out.update({
            "gate.new_samples.detection_rate": new["detection_rate"],
            "gate.new_samples.reference_detection_rate": new["reference_detection_rate"],
            "gate.new_samples.detection_rate_any_class": new["detection_rate_any_class"],
        })  # fmt: skip
        out.update({f"gate.new_samples.per_class.{k}": v for k, v in new["per_class"].items()})
    if new.get("trained_on_detection_rate") is not None:
        out["gate.trained_on.detection_rate"] = new["trained_on_detection_rate"]
    if "ab" in gates:
        out["gate.ab.worst_drop"] = gates["ab"]["worst_drop"]
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


def _record(cfg: DictConfig, record: dict) -> None:
    """Version tags, metrics and the report on the candidate's run (no alias moves)."""
    name, version = cfg.mlflow.registered_model, record["candidate"]["version"]
    tags = {
        "decision": record["decision"],
        "gate.decision": record["decision"],
        "gate.reference_version": record["production"]["version"],
        "gate.reference_alias": record["production"]["alias"],
        "gate.time": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    tags.update({f"gate.{key}.decision": g["decision"] for key, g in record["gates"].items()})
    tags.update({key: f"{record['figures'][key]:.4f}" for key in TAG_FIGURES if key in record["figures"]})
    registry.set_version_tags(name, version, tags)
    run_id = record["candidate"]["run_id"]
    if not run_id:
        return
    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in record["figures"].items()])
    # both models' figures under the same names, so the MLflow compare view lines them up
    reference_run = registry.client().get_model_version(name, record["production"]["version"]).run_id
    for role, rid in (("candidate", run_id), ("reference", reference_run)):
        if rid:
            found = set_metrics(record["measured"][role])
            client.log_batch(rid, metrics=[Metric(k, v, now, int(version)) for k, v in found.items()])
    client.set_tag(run_id, "gate.decision", record["decision"])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gate"
        folder.mkdir()
        (folder / "report.md").write_text(report_markdown(record))
        (folder / "decision.json").write_text(json.dumps(record, indent=2, sort_keys=True, default=float))
        per_class_plot(record, folder / "per_class.png")
        client.log_artifacts(run_id, str(folder), artifact_path="gate")


def set_metrics(measured: dict) -> dict[str, float]:
    """``gate/<set>/<figure>`` metrics of one model (the same names for candidate and reference)."""
    out = {}
    for key, m in measured.items():
        if not m.get("objects"):
            continue
        for figure in ("map50", "map50_95", "detection_rate", "detection_rate_any_class"):
            out[f"gate/{key}/{figure}"] = m[figure]
        out.update({f"gate/{key}/detection_rate/{cls}": v for cls, v in m["detection_rate_per_class"].items()})
        out.update({f"gate/{key}/ap50/{cls}": v for cls, v in m["ap50"].items()})
    return {k: float(v) for k, v in out.items() if v is not None and np.isfinite(v)}


def report_markdown(record: dict) -> str:
    cand, ref = record["measured"]["candidate"], record["measured"]["reference"]
    c, r = record["candidate"]["version"], record["production"]["version"]
    lines = [f"# Gate report: v{c} vs v{r}", "", f"**Decision: {record['decision'].upper()}**", ""]
    lines += [f"- {line}" for line in record["summary"].splitlines()[1:]] + [""]
    lines += [f"| anchor test, AP50 per class | v{r} | v{c} |", "|---|---|---|"]
    for cls, value in ref["anchor_test"]["ap50"].items():
        lines.append(f"| {cls} | {value:.3f} | {cand['anchor_test']['ap50'].get(cls, float('nan')):.3f} |")
    for key, label in (("pool_holdout", "pool holdout (never trained on)"),
                       ("pool_trained_on", "pool train (trained on: not evidence of generalisation)")):  # fmt: skip
        if not cand[key].get("objects"):
            continue
        lines += ["", f"| detection rate, {label} | v{r} | v{c} |", "|---|---|---|"]
        lines.append(f"| all classes | {ref[key]['detection_rate']:.3f} | {cand[key]['detection_rate']:.3f} |")
        lines.append(f"| ignoring class (diagnostic) | {ref[key]['detection_rate_any_class']:.3f} | "
                     f"{cand[key]['detection_rate_any_class']:.3f} |")  # fmt: skip
        for cls, value in ref[key]["detection_rate_per_class"].items():
            theirs = cand[key]["detection_rate_per_class"].get(cls, float("nan"))
            lines.append(f"| {cls} | {value:.3f} | {theirs:.3f} |")
    return "\n".join(lines) + "\n"


def per_class_plot(record: dict, path: Path) -> None:
    """Per-class comparison: anchor-test AP50 and pool-holdout detection rate, reference vs candidate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cand, ref = record["measured"]["candidate"], record["measured"]["reference"]
    c, r = record["candidate"]["version"], record["production"]["version"]
    threshold = float(record["gates"]["new_samples"].get("pass_above", 0.8))
    panels = [("anchor_test", "ap50", "anchor test: AP50 (Gate 1)")]
    if cand["pool_holdout"].get("objects"):
        panels.append(("pool_holdout", "detection_rate_per_class", "pool holdout: detection rate (Gate 2)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.6), squeeze=False)
    for ax, (key, field, title) in zip(axes[0], panels, strict=True):
        classes = list(ref[key][field])
        x = np.arange(len(classes))
        ax.bar(x - 0.2, [ref[key][field][k] for k in classes], 0.4, label=f"v{r} (reference)", color="#9aa5b1")
        ax.bar(x + 0.2, [cand[key][field].get(k, 0.0) for k in classes], 0.4, label=f"v{c} (candidate)",
               color="#2f6fdb")  # fmt: skip
        ax.set_xticks(x, classes, rotation=30, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_title(title)
        if key == "pool_holdout":
            ax.axhline(threshold, color="#c0392b", linestyle="--", linewidth=1, label=f"Gate 2 pass > {threshold:.0%}")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize=8, ncol=len(labels), frameon=False)
    fig.suptitle(f"v{c} vs v{r}: {record['decision'].upper()}", x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- the stage


def lineage_key(cfg: DictConfig) -> dict:
    """The DVC output: what the gate's decisions depend on (same on every machine for the same inputs)."""
    build = resolve_path(cfg, "build")
    keys = {src: build / src / "lineage.json" for src in SOURCES}
    return {
        "stage": STAGE,
        "config_hash": config_hash(cfg.gate),
        **{f"{src}_lineage_sha256": sha256_file(p) if p.is_file() else "" for src, p in keys.items()},
        "anchor_manifest_sha256": manifest_hash(resolve_path(cfg, "anchor") / "manifest.jsonl"),
        "pool_manifest_sha256": manifest_hash(resolve_path(cfg, "pool") / "manifest.jsonl"),
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
            metrics[source] = {"decision": record["decision"], "version": record["candidate"]["version"],
                               **record["figures"]}  # fmt: skip
        write_json(out / filename, _jsonable(record))
        results[source] = record
    write_json(out / "metrics.json", metrics)
    write_json(out / "lineage.json", lineage_key(cfg))
    return {"decisions": {k: v.get("decision", "skipped") for k, v in results.items()}}


def _jsonable(record: dict) -> dict:
    return json.loads(json.dumps(record, default=float, allow_nan=True))


main = hydra_entry(run)

if __name__ == "__main__":
    main()
