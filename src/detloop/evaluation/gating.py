"""Gate one candidate: measure it and its reference on the same sets with one evaluator, decide, record.

The candidate and its reference (the ``production`` holder for a fine-tune, the ``base`` holder for a
retrained base) are predicted once per set; the rules (:mod:`detloop.evaluation.gates`) decide and
the decision is recorded on the candidate's run and version. No alias moves here."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import numpy as np
from mlflow.entities import Metric, RunTag
from omegaconf import DictConfig

from detloop.core.config import resolve_path
from detloop.core.errors import BadInput
from detloop.core.stage import stage_dir
from detloop.data import pool
from detloop.data.datasets import anchor_images, anchor_names
from detloop.data.yolo_format import is_image_name
from detloop.evaluation import evaluator, label_check, predictions
from detloop.evaluation.gates import (
    TAG_FIGURES,
    ab_gate,
    combine,
    figures,
    new_samples_gate,
    regression_gate,
    served_gate,
    summary,
)
from detloop.evaluation.measure import figure_tags, measure
from detloop.evaluation.report import per_class_plot, report_markdown
from detloop.model import runtime
from detloop.model.pyfunc import exported_onnx, model_weights
from detloop.tracking import oversight, records, registry, runs

log = logging.getLogger(__name__)

SERVED_SETS = ("anchor_test", "pool_holdout")  # the served runtime is checked on the sets Gates 1 and 2 decide on


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
        raise BadInput(
            f"gate.ab.data: {len(unlabelled)} image(s) without labels",
            [f"{p}: no label file {evaluator.label_path(p)}" for p in unlabelled[:20]],
        )
    size = min(int(cfg.gate.ab.size), len(images))
    picks = np.random.default_rng(int(cfg.gate.ab.seed)).choice(len(images), size=size, replace=False)
    return [images[i] for i in sorted(picks.tolist())]


def reference_version(cfg: DictConfig, candidate: str, alias: str) -> str:
    """The version to compare with: the alias holder (or, if that is the candidate, its rollback target)."""
    name = cfg.mlflow.registered_model
    holder = registry.alias_holder(name, alias)
    if holder == candidate:
        holder = registry.client().get_model_version(name, candidate).tags.get("rollback_to") or None
    if holder is None:
        raise BadInput(
            f"nothing to compare v{candidate} with: no other version holds '{alias}'",
            ["run the base stage first (dvc repro base)"],
        )
    return holder


def trusted_kind(mv) -> str:
    """A version's kind from its training run's params (the tag can be edited in the MLflow UI)."""
    if mv.run_id:
        kind, _ = records.run_kind(registry.client().get_run(mv.run_id).data.params)
        if kind:
            return kind
    return (mv.tags or {}).get("kind", "")


def gate_version(cfg: DictConfig, candidate: str, *, alias: str = "production") -> dict:
    """Evaluate ``candidate`` against the ``alias`` holder, decide, and record the decision in MLflow."""
    runs.setup(cfg)
    oversight.watch(cfg)  # a move made in the MLflow UI is recorded (and refused if it breaks a rule) first
    name = cfg.mlflow.registered_model
    reference = reference_version(cfg, candidate, alias)
    names = anchor_names(resolve_path(cfg, "anchor"))
    sets = gate_sets(cfg)
    kept: dict[str, dict] = {key: {} for key in label_check.GATE_SETS}  # the candidate's pool predictions, reused
    with tempfile.TemporaryDirectory(dir=stage_dir(cfg, "gate")) as tmp:
        results, served_as = _measure_both(cfg, candidate, reference, sets, names, Path(tmp), kept)
    cand, ref = results["candidate"], results["reference"]
    gates = {
        "regression": regression_gate(cfg, cand["anchor_test"], ref["anchor_test"]),
        "new_samples": new_samples_gate(cfg, cand["pool_holdout"], ref["pool_holdout"], cand["pool_trained_on"]),
    }
    if "ab" in sets:
        gates["ab"] = ab_gate(cfg, cand["ab"], ref["ab"])
    gates["served"] = served_gate(cfg, cand, results.get("served"), served_as)
    decision = combine(gates)
    mv = registry.client().get_model_version(name, candidate)
    record = {
        "skipped": False,
        "decision": decision,
        "candidate": {"name": name, "version": candidate, "kind": trusted_kind(mv), "run_id": mv.run_id},
        "production": {"version": reference, "alias": alias},
        "gates": gates,
        "figures": figures(gates, cand, ref),
        "sets": {key: {"images": cand[key]["images"], "objects": cand[key]["objects"]} for key in sets},
        "summary": summary(candidate, reference, alias, decision, gates),
        "measured": results,
        "label_check": label_check.at_gate(cfg, candidate, kept, names),  # pool labels the models contradict
    }
    note = oversight.held_against_rules(cfg, alias, reference)
    if note:  # policy record kept it: the candidate is compared with what serves, and the report says so
        record["reference_note"] = note
        record["summary"] += f"\nWARNING: the reference {note}."
    _record(cfg, record)
    log.info("%s", record["summary"])
    return record


def _measure_both(
    cfg: DictConfig,
    candidate: str,
    reference: str,
    sets: dict[str, list[Path]],
    names: dict[int, str],
    tmp: Path,
    kept: dict[str, dict] | None = None,
) -> tuple[dict[str, dict], str]:
    """Both versions measured on every set, and the candidate's served runtime on the sets Gates 1 and 2
    decide on; returns ``({candidate, reference[, served]}: {set: figures}, served_as)``."""
    name = cfg.mlflow.registered_model
    kept = kept if kept is not None else {}
    results: dict[str, dict] = {}
    served_as = "torch"
    for role, version in (("candidate", candidate), ("reference", reference)):
        weights, config = model_weights(f"models:/{name}/{version}", tmp / role)
        imgsz = int(config.get("imgsz", 640))
        results[role] = {
            key: measure(cfg, weights, imgsz, images, names, keep=kept.get(key) if role == "candidate" else None)
            for key, images in sets.items()
        }
        if role == "candidate":
            served_as, served_file = _served(cfg, weights, config)
            if served_file is not None:
                results["served"] = {key: measure(cfg, served_file, imgsz, sets[key], names) for key in SERVED_SETS}
    return results, served_as


def predict_ahead(cfg: DictConfig, candidate: str, workdir: Path, *, alias: str = "production") -> bool:
    """Make the prediction passes :func:`gate_version` of ``candidate`` will make, and keep them in the
    prediction cache (``evaluate.cache``), so that the gate reads them without loading a model. The versions'
    files are fetched into a temporary folder under ``workdir`` (the caller's stage folder), removed after.

    Called by the fine-tune stage once its version is registered, where torch and Ultralytics are loaded
    already (the base stage does the same for ``evaluate``). The passes are the gate's own
    (:func:`_measure_both`: the same weights files, images and settings), so the gate's figures are those it
    would compute itself; a pass the gate does not find (the reference moved in between, the pool changed)
    it simply makes. False when the cache is off, there is nothing to gate on yet or a pass failed (the gate
    says why): the fine-tune's registered version and outputs stand either way.
    """
    if predictions.cache_settings(cfg)[0] is None:
        return False
    try:
        reference = reference_version(cfg, candidate, alias)
        sets = gate_sets(cfg)
    except BadInput as err:  # the gate stage reports it, with its hints
        log.info("the gate's passes are not made ahead: %s", err)
        return False
    started = time.perf_counter()
    names = anchor_names(resolve_path(cfg, "anchor"))
    try:
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            _measure_both(cfg, candidate, reference, sets, names, Path(tmp))
    except Exception as err:  # the version is registered: the gate makes the passes and reports what fails
        log.warning("the gate's passes are not made ahead (the gate makes them): %s: %s", type(err).__name__, err)
        return False
    seconds = time.perf_counter() - started
    log.info("the gate's passes of v%s and its reference v%s kept for the gate: %.2f s", candidate, reference, seconds)
    return True


def _served(cfg: DictConfig, weights: Path, config: dict) -> tuple[str, Path | None]:
    """The runtime the candidate will be served with (its config's ``runtime``, as ``serve`` chooses) and
    the file to measure for the served-model check (None: the weights already gated, or the check is off)."""
    exported = exported_onnx(weights)
    chosen = runtime.choose(str(config.get("runtime") or "auto"), exported)
    if chosen == "torch" or not cfg.gate.served.enabled:
        return chosen, None
    return f"onnxruntime {runtime.onnx_version()}", exported


def _record(cfg: DictConfig, record: dict) -> None:
    """The gate record, metrics and report in the candidate's run, then the headline version tags.

    ``gate/decision.json`` is logged first: it is the record the rules trust (artifacts cannot be edited
    in the MLflow UI, tags can; see :mod:`detloop.tracking.records`), and a gate killed before the tags
    are written leaves tags that disagree with it, which the rules refuse until the gate runs again.
    The version keeps what people search and compare (decision, Gate 1 drop, Gate 2 rate, reference,
    anchor-test mAP50); the per-gate decisions, time and the other figures are tags of the run.
    """
    name, version = cfg.mlflow.registered_model, record["candidate"]["version"]
    run_id = record["candidate"]["run_id"]
    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    when = datetime.now(UTC).isoformat(timespec="seconds")
    if run_id:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "gate"
            folder.mkdir()
            (folder / "report.md").write_text(report_markdown(record))
            (folder / "decision.json").write_text(
                json.dumps({**record, "time": when}, indent=2, sort_keys=True, default=float)
            )
            per_class_plot(record, folder / "per_class.png")
            client.log_artifacts(run_id, str(folder), artifact_path="gate")
        label_check.log_to_run(cfg, client, run_id, record.get("label_check"))
        client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in record["figures"].items()])
        # both models' figures under the same names, so the MLflow compare view lines them up
        reference_run = registry.client().get_model_version(name, record["production"]["version"]).run_id
        for role, rid in (("candidate", run_id), ("reference", reference_run)):
            if rid:
                found = set_metrics(record["measured"][role])
                client.log_batch(rid, metrics=[Metric(k, v, now, int(version)) for k, v in found.items()])
        run_tags = {
            "gate.decision": record["decision"],
            "gate.reference_version": record["production"]["version"],
            "gate.reference_alias": record["production"]["alias"],
            "gate.time": when,
            **{f"gate.{key}.decision": g["decision"] for key, g in record["gates"].items()},
            **figure_tags("anchor_test", record["measured"]["candidate"]["anchor_test"]),
        }
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in run_tags.items()])
    tags = {
        "decision": record["decision"],
        "gate.decision": record["decision"],
        "gate.reference_version": record["production"]["version"],
        "eval.anchor_test.map50": figure_tags("anchor_test", record["measured"]["candidate"]["anchor_test"])[
            "eval.anchor_test.map50"
        ],
    }
    tags.update({key: f"{record['figures'][key]:.4f}" for key in TAG_FIGURES if key in record["figures"]})
    registry.set_version_tags(name, version, tags)
    reference = record["production"]["version"]  # measured the same way: one anchor-test mAP50 per version
    ref_figures = figure_tags("anchor_test", record["measured"]["reference"]["anchor_test"])
    registry.set_version_tags(name, reference, {"eval.anchor_test.map50": ref_figures["eval.anchor_test.map50"]})
    registry.describe(cfg, version, headline(record))


def headline(record: dict) -> str:
    """The version's description after its gate: kind, decision and the headline figures in one line."""
    figures, cand = record["figures"], record["candidate"]
    parts = [
        f"{cand.get('kind') or 'model'} v{cand['version']}: gate {record['decision'].upper()} "
        f"vs v{record['production']['version']}"
    ]
    if "gate.regression.candidate_map50" in figures:
        parts.append(
            f"anchor-test mAP50 {figures['gate.regression.candidate_map50']:.4f} "
            f"(drop {figures['gate.regression.drop']:.2f})"
        )
    if "gate.new_samples.detection_rate" in figures:
        parts.append(f"new-failure detection {figures['gate.new_samples.detection_rate']:.3f}")
    if "gate.ab.worst_drop" in figures:
        parts.append(f"A/B worst class drop {figures['gate.ab.worst_drop']:.2f}")
    summary = record.get("summary", "").strip()
    return " · ".join(parts) + (f"\n\n{summary}" if summary else "")


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


def jsonable(record: dict) -> dict:
    return json.loads(json.dumps(record, default=float, allow_nan=True))
