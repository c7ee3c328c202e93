"""The label check in the FiftyOne App: a saved view of the pool samples whose labels the models contradict.

``detloop inspect --set pool --view label-check`` reads the newest check (the gate record
``build/gate/decision.json``, else the before-training check ``build/finetune/label_check.json``; see
:mod:`detloop.evaluation.label_check`) and, in the pool dataset (``<prefix>-pool``):

* tags the flagged samples ``label-check`` and sets ``label_check_score`` and ``label_check_reason``
  (cleared on the samples a previous check flagged and this one does not),
* tags the suspect labels of ``ground_truth`` ``label-check`` (label tags),
* puts the models' contradicting boxes into ``label_check`` (each tagged with its kind: wrong_class,
  misplaced, unlabelled),
* saves the view ``gate.label_check.view``: the flagged samples, highest score first (ties by id), which the
  App opens at ``http://<fiftyone.app.address>:<port>/datasets/<prefix>-pool?view=label-check``.
"""

from __future__ import annotations

import json
import logging

from omegaconf import DictConfig

from detloop.core.config import resolve_path
from detloop.core.errors import BadInput
from detloop.evaluation.label_check import FILE, app_link
from detloop.fiftyone.load import GT_FIELD

log = logging.getLogger(__name__)

TAG = "label-check"  # sample tag of the flagged samples and label tag of their suspect labels
SCORE_FIELD, REASON_FIELD, EVIDENCE_FIELD = "label_check_score", "label_check_reason", "label_check"


def latest_check(cfg: DictConfig) -> dict:
    """The newest label check: the gate's (with the candidate), else the base model's before training."""
    build = resolve_path(cfg, "build")
    gate, before = build / "gate" / "decision.json", build / "finetune" / FILE
    if gate.is_file() and (found := json.loads(gate.read_text()).get("label_check")):
        return found
    if before.is_file():
        return json.loads(before.read_text())
    raise BadInput(
        "no label check to show",
        [f"{gate}: no label_check (run the gate stage)", f"{before}: not found (run the finetune stage)"],
    )


def save_view(cfg: DictConfig, view_name: str, datasets: dict, check: dict | None = None) -> dict:
    """Mark the flagged samples of ``check`` (default :func:`latest_check`) in the pool dataset of
    ``datasets`` (set name -> dataset, as :func:`detloop.fiftyone.inspection.inspect_sets` returns them)
    and save the view. Returns ``{dataset, view, url, ids}`` (``ids``: detloop ids in the view's order)."""
    wanted = str(cfg.gate.label_check.view)
    if view_name != wanted:
        raise BadInput(
            f"--view {view_name!r}: unknown view", [f"the label check's view is {wanted!r} (gate.label_check.view)"]
        )
    if "pool" not in datasets:
        raise BadInput(f"--view {view_name} shows pool samples", ["add --set pool"])
    return _save_view(cfg, datasets["pool"], wanted, check if check is not None else latest_check(cfg))


def _save_view(cfg: DictConfig, dataset, name: str, check: dict) -> dict:
    import fiftyone as fo

    flagged = {e["id"]: e for e in check["flagged"]}
    for field, kind in ((SCORE_FIELD, fo.FloatField), (REASON_FIELD, fo.StringField)):
        if not dataset.has_sample_field(field):
            dataset.add_sample_field(field, kind)
    if not dataset.has_sample_field(EVIDENCE_FIELD):
        dataset.add_sample_field(EVIDENCE_FIELD, fo.EmbeddedDocumentField, embedded_doc_type=fo.Detections)
    dataset.untag_samples(TAG)
    dataset.untag_labels(TAG, label_fields=GT_FIELD)
    ids, detloop_ids = dataset.values("id"), dataset.values("detloop_id")
    sizes = zip(dataset.values("metadata.width"), dataset.values("metadata.height"), strict=True)
    label_ids = dataset.values(f"{GT_FIELD}.detections.id")
    values: dict[str, dict] = {SCORE_FIELD: {}, REASON_FIELD: {}, EVIDENCE_FIELD: {}}
    suspect, marked = [], []
    for sample_id, detloop_id, size, labels in zip(ids, detloop_ids, sizes, label_ids, strict=True):
        entry = flagged.get(detloop_id)
        values[SCORE_FIELD][sample_id] = entry["score"] if entry else None
        values[REASON_FIELD][sample_id] = "; ".join(entry["reasons"]) if entry else None
        values[EVIDENCE_FIELD][sample_id] = _evidence(fo, entry, size) if entry else None
        if entry:
            marked.append(sample_id)
            suspect += [
                labels[f["label"]]
                for f in entry["findings"]
                if f["label"] is not None and f["label"] < len(labels or [])
            ]
    for field, by_id in values.items():
        dataset.set_values(field, by_id, key_field="id")
    missing = sorted(set(flagged) - set(detloop_ids))
    if missing:
        log.warning("%s: flagged samples not in the dataset (pool changed since the check?): %s", dataset.name, missing)
    dataset.select(marked).tag_samples(TAG)
    dataset.select_labels(ids=suspect, fields=GT_FIELD).tag_labels(TAG)
    view = dataset.match_tags(TAG).sort_by([(SCORE_FIELD, -1), ("detloop_id", 1)])
    models = ", ".join(f"{m} ({what})" for m, what in check["models"].items())
    dataset.save_view(name, view, description=f"label check by {models}: flagged pool samples by score", overwrite=True)
    link = app_link(cfg)
    print(f"label check: {len(marked)} flagged pool sample(s) in the view {name!r}: {link['url']}")
    return {"dataset": dataset.name, "view": name, "url": link["url"], "ids": view.values("detloop_id")}


def _evidence(fo, entry: dict, size: tuple[int, int]):
    """The models' contradicting boxes of one flagged sample as FiftyOne detections (tagged with the kind)."""
    width, height = size
    out = []
    for f in entry["findings"]:
        if f.get("pred_box") is None:
            continue
        x0, y0, x1, y1 = f["pred_box"]
        box = [x0 / width, y0 / height, (x1 - x0) / width, (y1 - y0) / height]
        out.append(fo.Detection(label=f["predicted"], bounding_box=box, confidence=f["conf"], tags=[f["kind"]]))
    return fo.Detections(detections=out)
