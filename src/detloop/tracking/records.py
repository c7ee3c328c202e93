"""What a version is and what its gate decided, read from records the MLflow UI cannot edit.

Version tags (``kind``, ``decision``, ``gate.*``, ``base_version``) are what people see and search
in the MLflow UI, and anyone can edit them there. The rules that depend on them (no ungated
promotion, never chain fine-tunes) read the evidence instead and compare it with the tags:

* **kind** and the base a fine-tune started from: the training run's params, which MLflow never lets
  anyone change once logged (param ``kind``; runs from before it was logged: the stage's param group,
  ``finetune.base_version`` for a fine-tune, ``base.*`` / ``retrain.*`` for a base).
* **gate decision and figures**: the gate's ``gate/decision.json`` artifact in the version's run
  (artifacts are not editable in the UI), checked to be about this model and version.

:func:`evidence` returns both and every tag that disagrees (``edited``), in words that name the
tag, what it says and what the record says.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.exceptions import MlflowException
from omegaconf import DictConfig

from detloop.tracking import registry

log = logging.getLogger(__name__)

GATE_RECORD = "gate/decision.json"  # artifact path in the candidate's run, written by the gate
KIND_PARAM = "kind"  # training run param, logged by every training stage
# tag -> key in the gate record's figures: the headline figures shown on the version
FIGURE_TAGS = {
    registry.GATE1_DROP: "gate.regression.drop",
    registry.GATE2_RATE: "gate.new_samples.detection_rate",
}


@dataclass(frozen=True)
class Evidence:
    """One version's trusted facts, and the tags that contradict them."""

    version: str
    run_id: str
    kind: str | None  # from the training run's params; None = no training run found
    base_version: str | None  # a fine-tune's starting version, from its params
    decision: str | None  # from the gate record; None = never gated
    figures: dict = field(default_factory=dict)  # the gate record's figures
    reference: str | None = None  # the version the gate compared it with
    edited: tuple[str, ...] = ()  # every tag that disagrees with the records

    @property
    def tampered(self) -> bool:
        return bool(self.edited)

    @property
    def gate_status(self) -> str:
        """``pass`` / ``review`` / ``reject`` from the record, ``none`` if never gated, ``edited`` if tags lie."""
        if self.tampered:
            return "edited"
        return self.decision or "none"

    def explain(self) -> str:
        return "; ".join(self.edited)


def run_kind(params: dict[str, str]) -> tuple[str | None, str | None]:
    """``(kind, base_version)`` from a training run's params (immutable in MLflow)."""
    kind = params.get(KIND_PARAM)
    if kind is None:
        if "finetune.base_version" in params:
            kind = "finetune"
        elif any(k.startswith(("base.", "retrain.")) for k in params):
            kind = "base"
    base = params.get("finetune.base_version") if kind == "finetune" else None
    return kind, (str(base) if base not in (None, "None") else None)


def gate_record(run_id: str) -> dict | None:
    """The gate's decision record logged in ``run_id`` (None when the version was never gated)."""
    folder = GATE_RECORD.rsplit("/", 1)[0]
    if GATE_RECORD not in {f.path for f in registry.client().list_artifacts(run_id, folder)}:
        return None  # listed first: a missing artifact is an error of a different type on every store
    with tempfile.TemporaryDirectory() as tmp:
        path = registry.client().download_artifacts(run_id, GATE_RECORD, tmp)
        try:
            return json.loads(Path(path).read_text())
        except (OSError, ValueError):
            log.warning("run %s: %s is not readable JSON; treated as no gate record", run_id, GATE_RECORD)
            return None


def _same_number(tag: str | None, value) -> bool:
    try:
        return math.isclose(float(tag), float(value), abs_tol=1e-4)
    except (TypeError, ValueError):
        return False


def compare(version: str, tags: dict, kind, base_version, record: dict | None) -> list[str]:
    """Every tag of ``version`` that disagrees with the training run's params or the gate record."""
    edited = []
    if kind is not None and tags.get("kind") != kind:
        edited.append(f"tag kind says {tags.get('kind')!r}, the training run's params say {kind!r}")
    if base_version is not None and tags.get("base_version") not in (None, base_version):
        edited.append(
            f"tag base_version says {tags.get('base_version')!r}, the training run's params say {base_version!r}"
        )
    decision = record.get("decision") if record else None
    if decision is None:
        for key in ("gate.decision", "decision"):
            if tags.get(key) in ("pass", "review"):
                edited.append(f"tag {key} says {tags[key]!r}, but v{version} has no gate record ({GATE_RECORD})")
        return edited
    for key in ("gate.decision", "decision"):
        if tags.get(key) != decision:
            shown = repr(tags[key]) if key in tags else "nothing (removed)"
            edited.append(f"tag {key} says {shown}, the gate record says {decision!r}")
    figures = record.get("figures") or {}
    for tag, key in FIGURE_TAGS.items():
        if key in figures and tag in tags and not _same_number(tags[tag], figures[key]):
            edited.append(f"tag {tag} says {tags[tag]}, the gate record says {float(figures[key]):.4f}")
    return edited


def evidence(cfg: DictConfig, version: str, tags: dict | None = None) -> Evidence:
    """The trusted kind and gate decision of ``version`` and the tags that contradict them."""
    name = cfg.mlflow.registered_model
    mv = registry.client().get_model_version(name, str(version))
    tags = dict(mv.tags or {}) if tags is None else tags
    kind = base_version = None
    record = None
    if mv.run_id:
        try:
            params = registry.client().get_run(mv.run_id).data.params
        except MlflowException:
            params = {}
        kind, base_version = run_kind(params)
        record = gate_record(mv.run_id)
        if record is not None:
            candidate = record.get("candidate") or {}
            if str(candidate.get("version")) != str(version) or candidate.get("name") != name:
                log.warning(
                    "run %s: %s is about %s v%s, not v%s",
                    mv.run_id,
                    GATE_RECORD,
                    candidate.get("name"),
                    candidate.get("version"),
                    version,
                )
                record = None
    return Evidence(
        version=str(version),
        run_id=mv.run_id or "",
        kind=kind,
        base_version=base_version,
        decision=record.get("decision") if record else None,
        figures=dict(record.get("figures") or {}) if record else {},
        reference=str((record.get("production") or {}).get("version") or "") or None if record else None,
        edited=tuple(compare(str(version), tags, kind, base_version, record)),
    )


def repair(cfg: DictConfig, version: str) -> dict[str, tuple[str | None, str]]:
    """Put ``version``'s kind, base, decision and headline figure tags back as its records say.

    Returns ``{tag: (old, new)}`` for every tag changed (empty when nothing disagreed).
    """
    name = cfg.mlflow.registered_model
    proof = evidence(cfg, version)
    tags = dict(registry.client().get_model_version(name, str(version)).tags or {})
    wanted: dict[str, str] = {}
    if proof.kind:
        wanted["kind"] = proof.kind
    if proof.base_version:
        wanted["base_version"] = proof.base_version
    if proof.decision:
        wanted["decision"] = wanted["gate.decision"] = proof.decision
        for tag, key in FIGURE_TAGS.items():
            if key in proof.figures:
                wanted[tag] = f"{float(proof.figures[key]):.4f}"
    changed = {k: (tags.get(k), v) for k, v in wanted.items() if tags.get(k) != v}
    if not proof.decision:
        for key in ("gate.decision", "decision"):
            if tags.get(key) in ("pass", "review"):
                changed[key] = (tags[key], "")
    for key, (_, new) in changed.items():
        if new:
            registry.client().set_model_version_tag(name, str(version), key, new)
        else:
            registry.client().delete_model_version_tag(name, str(version), key)
    return changed
