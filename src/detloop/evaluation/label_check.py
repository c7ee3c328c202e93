"""Label check: the pool samples whose verified labels the models contradict most.

Gate 2 fails for two reasons its figures cannot tell apart: the fine-tune did not learn the reported
failures, or their labels are wrong (a wrong label in the holdout lowers Gate 2; in the train split it
teaches the error). So the pool is ranked by how strongly the models disagree with its labels:

* before training, by the base model (stage ``finetune``: :func:`before_training` writes
  ``build/finetune/label_check.json``; the gate logs it to the candidate's run as ``label_check/base.json``);
* at the gate, by the candidate, from the gate's own predictions on the pool train and holdout sets (nothing
  is predicted twice), combined with the base's findings (:func:`at_gate`): the gate record's
  ``label_check``, ``label_check/gate.json`` and the tag ``label_check.flagged`` on the run, and a section of
  the gate report when Gate 2 does not pass, with a link to the FiftyOne App view of the flagged samples
  (built by ``detloop inspect --set pool --view label-check``).

The measure (``gate.label_check``), per label and model, on the predictions down to the evaluation's
confidence floor (``conf/evaluate``); "on" a label means IoU >= ``iou``:

* **wrong class**: a prediction of another class at ``confident`` or above is on the label and surer than
  any prediction of the label's class there; scores the difference of the two confidences;
* **misplaced box**: nothing on the label reaches ``low_conf``, but a confident prediction of its class that
  is on no label overlaps it partly; scores that prediction's confidence;
* **unmatched label**: nothing on the label reaches ``low_conf`` and nothing confident of its class is
  beside it: a spurious label, or an object the model cannot find (for the base model often the reported
  failure itself); ambiguous, so it scores ``miss_weight``;
* **missing label** (per prediction): a confident prediction on no label; scores its confidence.

Over several models, the findings on one label (or on one unlabelled object) are averaged over the models
that measured the sample, a model without that finding counting zero: what the base and the candidate both
contradict scores fully, what one of them contradicts half (a reported object the base missed and the
candidate learned is not a label problem). A sample's score is its strongest finding (its most suspect
label), ties broken by the sum of its findings (``total``): a page with many objects the models miss does
not outrank a label they confidently contradict.
FiftyOne Brain's ``compute_mistakenness`` computes a similar measure, but on a FiftyOne dataset (its
database) and a floor above this one; this one runs on the arrays the gate already holds.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from detloop.core.config import resolve_path
from detloop.core.errors import BadInput
from detloop.core.stage import stage_dir, write_json
from detloop.data import pool
from detloop.data.datasets import anchor_names
from detloop.data.manifest import MANIFEST, manifest_hash
from detloop.evaluation import evaluator
from detloop.evaluation.evaluator import Detections, GroundTruth
from detloop.evaluation.measure import predict
from detloop.evaluation.metrics import iou_matrix

log = logging.getLogger(__name__)

FILE = "label_check.json"  # build/finetune/label_check.json: the base model's check, before training
GATE_SETS = {"pool_trained_on": "train", "pool_holdout": "holdout"}  # the gate's pool sets and their split
VERDICTS = {
    "wrong_class": "likely wrong class",
    "misplaced": "likely misplaced box",
    "unmatched": "likely spurious label, or an object the model misses",
    "unlabelled": "likely missing label",
}


@dataclass(frozen=True)
class Settings:
    """``gate.label_check``: what counts as a disagreement, how it scores, what is listed."""

    iou: float = 0.5
    low_conf: float = 0.05
    confident: float = 0.5
    miss_weight: float = 0.5
    min_score: float = 0.5
    top_n: int = 10

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 < self.iou <= 1.0:
            problems.append(f"gate.label_check.iou={self.iou}: must be in (0, 1]")
        if not 0.0 <= self.low_conf <= self.confident <= 1.0:
            problems.append(
                f"gate.label_check.low_conf={self.low_conf}, confident={self.confident}: "
                "need 0 <= low_conf <= confident <= 1"
            )
        if self.miss_weight < 0 or self.min_score < 0:
            problems.append(f"gate.label_check.miss_weight={self.miss_weight}, min_score={self.min_score}: not >= 0")
        if self.top_n < 1:
            problems.append(f"gate.label_check.top_n={self.top_n}: must be >= 1")
        if problems:
            raise BadInput("gate.label_check: invalid settings", problems)


def settings(cfg: DictConfig) -> Settings | None:
    """The check's settings, or None when ``gate.label_check.enabled`` is false."""
    lc = cfg.gate.label_check
    if not bool(lc.enabled):
        return None
    return Settings(
        iou=float(lc.iou),
        low_conf=float(lc.low_conf),
        confident=float(lc.confident),
        miss_weight=float(lc.miss_weight),
        min_score=float(lc.min_score),
        top_n=int(lc.top_n),
    )


# --------------------------------------------------------------------------- one model, one image


def findings(gt: GroundTruth, det: Detections, names: dict[int, str], s: Settings) -> list[dict]:
    """What one model's predictions on one image say against its labels (see the module docstring).

    Each finding: ``kind``, ``label`` (index of the label in the label file, None for a missing label),
    ``class`` (the label's class; for a missing label the predicted one), ``predicted`` (the contradicting
    prediction's class), ``conf``, ``iou``, ``weight`` (its score), ``box`` and ``pred_box`` (pixel xyxy).
    """
    ious = iou_matrix(gt.boxes, det.boxes)  # (labels, predictions)
    on = ious >= s.iou
    same = gt.cls[:, None] == det.cls[None, :]
    confident = det.conf >= s.confident
    on_no_label = ~on.any(axis=0)
    used = np.zeros(len(det.cls), dtype=bool)  # predictions that explain a misplaced label
    out = []
    for i in range(len(gt.cls)):
        support, rival = _best(det.conf, on[i] & same[i]), _best(det.conf, on[i] & ~same[i])
        if rival >= 0 and det.conf[rival] >= s.confident and det.conf[rival] > _conf(det, support):
            weight = det.conf[rival] - _conf(det, support)
            out.append(_finding("wrong_class", gt, det, names, i, rival, ious, weight))
        elif max(_conf(det, support), _conf(det, rival)) < s.low_conf:
            beside = _best(det.conf, (ious[i] > 0) & same[i] & confident & on_no_label & ~used)
            if beside >= 0:
                used[beside] = True
                out.append(_finding("misplaced", gt, det, names, i, beside, ious, det.conf[beside]))
            else:
                out.append(_finding("unmatched", gt, det, names, i, None, ious, s.miss_weight))
    kept: list[int] = []  # confident predictions on no label, one per object (class-agnostic)
    for j in np.argsort(-det.conf, kind="stable").tolist():
        if not (confident[j] and on_no_label[j] and not used[j]):
            continue
        if not kept or iou_matrix(det.boxes[[j]], det.boxes[kept]).max() < s.iou:
            kept.append(j)
            out.append(_finding("unlabelled", gt, det, names, None, j, ious, det.conf[j]))
    return out


def _best(conf: np.ndarray, mask: np.ndarray) -> int:
    """Index of the most confident prediction in ``mask``, or -1."""
    return int(np.argmax(np.where(mask, conf, -1.0))) if mask.any() else -1


def _conf(det: Detections, j: int) -> float:
    return float(det.conf[j]) if j >= 0 else 0.0


def _finding(kind, gt, det, names, i: int | None, j: int | None, ious, weight) -> dict:
    def box(b) -> list[float]:
        return [round(float(v), 1) for v in b]

    label_cls = names.get(int(gt.cls[i]), str(int(gt.cls[i]))) if i is not None else None
    predicted = names.get(int(det.cls[j]), str(int(det.cls[j]))) if j is not None else None
    return {
        "kind": kind,
        "label": i,
        "class": label_cls if label_cls is not None else predicted,
        "predicted": predicted,
        "conf": round(float(det.conf[j]), 4) if j is not None else None,
        "iou": round(float(ious[i, j]), 4) if i is not None and j is not None else None,
        "weight": round(float(weight), 4),
        "box": box(gt.boxes[i]) if i is not None else box(det.boxes[j]),
        "pred_box": box(det.boxes[j]) if j is not None else None,
    }


# --------------------------------------------------------------------------- models, samples, ranking


def combine(by_model: dict[str, list[dict]], s: Settings) -> list[dict]:
    """One sample's findings of several models merged: the same label (or unlabelled object) is one
    finding whose weight is the mean over the models (a model without it counts zero); most weight first.
    Each merged finding keeps the strongest model's details and ``by``: per model its kind, conf, weight."""
    groups: list[dict[str, dict]] = []
    for model, found in by_model.items():
        for f in found:
            group = next((g for g in groups if _same_subject(next(iter(g.values())), f, s.iou)), None)
            if group is None:
                groups.append({model: f})
            elif model not in group or group[model]["weight"] < f["weight"]:
                group[model] = f
    n = max(len(by_model), 1)
    merged = []
    for group in groups:
        best = max(group.values(), key=lambda f: f["weight"])
        merged.append(
            {
                **best,
                "weight": round(sum(f["weight"] for f in group.values()) / n, 4),
                "by": {m: {k: f[k] for k in ("kind", "predicted", "conf", "weight")} for m, f in group.items()},
            }
        )
    return sorted(merged, key=lambda f: -f["weight"])


def _same_subject(a: dict, b: dict, iou: float) -> bool:
    if a["label"] is not None or b["label"] is not None:
        return a["label"] == b["label"]
    return float(iou_matrix(np.array([a["box"]]), np.array([b["box"]]))[0, 0]) >= iou


def sample_entry(sample_id: str, split: str, by_model: dict[str, list[dict]], s: Settings) -> dict:
    """One pool sample: its score (its strongest merged finding), their sum, the reasons in words, the findings."""
    merged = combine(by_model, s)
    return {
        "id": sample_id,
        "split": split,
        "score": merged[0]["weight"] if merged else 0.0,
        "total": round(sum(f["weight"] for f in merged), 4),
        "reasons": [reason(f, s) for f in merged],
        "findings": merged,
    }


def reason(f: dict, s: Settings) -> str:
    """A finding in one line, e.g. ``label 2 'date' looks like 'stamp' (v1 0.93, v2 0.88): likely wrong class``."""
    who = ", ".join(f"{m} {x['conf']:.2f}" if x["conf"] is not None else m for m, x in f["by"].items())
    verdict = VERDICTS[f["kind"]]
    if f["kind"] == "wrong_class":
        return f"label {f['label']} '{f['class']}' looks like '{f['predicted']}' ({who}): {verdict}"
    if f["kind"] == "misplaced":
        return f"label {f['label']} '{f['class']}' is off its object (IoU {f['iou']:.2f}; {who}): {verdict}"
    if f["kind"] == "unmatched":
        return f"label {f['label']} '{f['class']}': no prediction on it reaches conf {s.low_conf:g} ({who}): {verdict}"
    return f"a '{f['predicted']}' where no label is ({who}): {verdict}"


def ranked(cfg: DictConfig, entries: list[dict], s: Settings, models: dict[str, str]) -> dict:
    """The check's result: samples by score (ties by total, then id), the top ``top_n`` at ``min_score`` or above."""
    order = sorted(entries, key=lambda e: (-e["score"], -e["total"], e["id"]))
    flagged = [e for e in order if e["score"] >= s.min_score]
    newest = list(models)[-1] if models else ""
    return {
        "models": models,
        "settings": asdict(s),
        "checked": len(entries),
        "flagged_total": len(flagged),
        "flagged": flagged[: s.top_n],
        "app": app_link(cfg, newest.lstrip("v")),
    }


def app_link(cfg: DictConfig, version: str = "") -> dict:
    """The FiftyOne App URL of the saved view and the command that builds it and serves the App."""
    app, view = cfg.fiftyone.app, str(cfg.gate.label_check.view)
    dataset = f"{cfg.fiftyone.dataset_prefix}-pool"  # detloop.fiftyone.load.dataset_name (a floor above)
    slug = re.sub(r"[^a-z0-9]+", "-", view.lower()).strip("-")  # FiftyOne's saved-view slug
    model = f" --model {version} --no-evaluate" if version.isdigit() else " --no-predictions"
    return {
        "dataset": dataset,
        "view": view,
        "url": f"http://{app.address}:{int(app.port)}/datasets/{dataset}?view={slug}",
        "command": f"detloop inspect --set pool --view {view}{model} --app",
    }


# --------------------------------------------------------------------------- before training, at the gate


def model_findings(
    cfg: DictConfig, images: list[Path], gts: list[GroundTruth], dets: list[Detections], s: Settings
) -> dict[str, list[dict]]:
    """Findings per sample id (the image's stem, the pool id) of one model's predictions ``dets``."""
    names = anchor_names(resolve_path(cfg, "anchor"))
    return {Path(p).stem: findings(g, d, names, s) for p, g, d in zip(images, gts, dets, strict=True)}


def before_training(cfg: DictConfig, weights: Path, out: Path, version: str) -> dict | None:
    """The base model's check of every pool sample (all splits), before it is fine-tuned on them.

    Writes ``out/label_check.json`` (the ranking, and every sample's findings for the gate to combine with
    the candidate's) and logs the top samples. Predicts like the gate (``conf/evaluate``, the model's
    training image size). Returns the result, or None when the check is off or the pool is empty.
    """
    s = settings(cfg)
    if s is None:
        return None
    from detloop.model.yolo import load_model

    train_args = (getattr(load_model(weights), "ckpt", None) or {}).get("train_args") or {}
    imgsz = int(train_args.get("imgsz") or cfg.finetune.train.imgsz)
    names = anchor_names(resolve_path(cfg, "anchor"))
    label = f"v{version}"
    entries, every = [], {}
    for split in cfg.pool.split:
        images = pool.pool_samples(cfg, split)
        if not images:
            continue
        gts = evaluator.load_ground_truth(images, num_classes=max(names) + 1)
        dets = predict(cfg, weights, imgsz, images)  # as measure() does: the gate's reference sees the same boxes
        for sample_id, found in model_findings(cfg, images, gts, dets, s).items():
            entries.append(sample_entry(sample_id, split, {label: found}, s))
            if found:
                every[sample_id] = found
    if not entries:
        return None
    result = {
        "stage": "finetune",
        "when": "before training",
        "pool_manifest_sha256": manifest_hash(resolve_path(cfg, "pool") / MANIFEST),
        **ranked(cfg, entries, s, {label: "base, before training"}),
        "findings": every,
    }
    write_json(Path(out) / FILE, result)
    _log_top(result, f"base {label}")
    return result


def at_gate(cfg: DictConfig, candidate: str, kept: dict[str, dict], names: dict[int, str]) -> dict | None:
    """The candidate's check from the gate's pool predictions (``kept``: per gate set the ``images``,
    ``ground_truth`` and ``detections`` that :func:`detloop.evaluation.measure.measure` kept), combined with
    the base's before-training check when it was made on the same pool. None when the check is off."""
    s = settings(cfg)
    if s is None:
        return None
    base = base_check(cfg)
    models = {m: what for m, what in (base or {}).get("models", {}).items()}
    cand = f"v{candidate}"
    models[cand] = "candidate"
    entries = []
    for key, split in GATE_SETS.items():
        held = kept.get(key) or {}
        found = model_findings(cfg, held.get("images", []), held.get("ground_truth", []), held.get("detections", []), s)
        for sample_id, mine in found.items():
            by_model = {m: base["findings"].get(sample_id, []) for m in (base or {}).get("models", {})}
            entries.append(sample_entry(sample_id, split, {**by_model, cand: mine}, s))
    result = ranked(cfg, entries, s, models)
    _log_top(result, " + ".join(models))
    return result


def base_check(cfg: DictConfig) -> dict | None:
    """The before-training check (``build/finetune/label_check.json``) if it was made on the current pool."""
    path = stage_dir(cfg, "finetune") / FILE
    if not path.is_file():
        return None
    found = json.loads(path.read_text())
    if found.get("pool_manifest_sha256") != manifest_hash(resolve_path(cfg, "pool") / MANIFEST):
        log.info("%s: made on another pool; the gate's label check uses the candidate alone", path)
        return None
    return found


def _log_top(result: dict, who: str) -> None:
    top = result["flagged"][:3]
    log.info(
        "label check (%s): %d of %d pool samples flagged%s",
        who,
        result["flagged_total"],
        result["checked"],
        "; top: " + "; ".join(f"{e['id']} {e['score']:.2f} ({e['reasons'][0]})" for e in top) if top else "",
    )


def log_to_run(cfg: DictConfig, client, run_id: str, check: dict | None) -> None:
    """The gate's check (``label_check/gate.json``), the base's before-training check (``label_check/base.json``),
    the flagged ids as the run tag ``label_check.flagged`` and the counts as metrics, on the candidate's run."""
    if not check:
        return
    from mlflow.entities import Metric, RunTag

    client.log_dict(run_id, check, "label_check/gate.json")
    base = base_check(cfg)
    if base is not None:
        client.log_dict(run_id, base, "label_check/base.json")
    ids = ", ".join(e["id"] for e in check["flagged"])
    top = check["flagged"][0]["score"] if check["flagged"] else 0.0
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[
            Metric("label_check/flagged", check["flagged_total"], now, 0),
            Metric("label_check/top_score", top, now, 0),
        ],
        tags=[RunTag("label_check.flagged", ids[:5000] or "none")],
    )
