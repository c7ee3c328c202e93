"""The MLflow Model Registry as the promotion and rollback mechanism.

Registry stages are deprecated since MLflow 2.9, so the card's stages are aliases (``base``,
``staging``, ``production``). MLflow keeps no history of alias moves; every move is recorded as a
run in the audit experiment (who, why, from, to, figures), which the MLflow UI shows and
``detloop registry --history`` prints.
"""

from __future__ import annotations

import getpass
import json
import logging
from datetime import UTC, datetime

import mlflow
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig

log = logging.getLogger(__name__)

ALIASES = ("base", "staging", "production")


def client() -> mlflow.MlflowClient:
    return mlflow.MlflowClient()


def alias_holder(name: str, alias: str) -> str | None:
    """The version holding ``alias`` (as a string), or None."""
    try:
        return str(client().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


MODEL_DESCRIPTION = (
    "The detloop detector. Aliases: `base` = the model every fine-tune starts from; "
    "`production` = the served model; `staging` = a candidate waiting for human review. "
    "Version tags: `kind` (base|finetune), `decision` (pass|review|reject|bootstrap), gate figures and "
    "`lineage.*` (git commit, data.dvc md5, config hash, run id). Every alias move (who, when, why) is a run "
    "in the experiment `{audit}`."
)


def describe(cfg: DictConfig, version: str, text: str) -> None:
    """Version description (shown in the MLflow UI) and, once, the registered model's description."""
    c = client()
    name = cfg.mlflow.registered_model
    c.update_model_version(name, str(version), description=text)
    if not c.get_registered_model(name).description:
        c.update_registered_model(name, description=MODEL_DESCRIPTION.format(audit=cfg.mlflow.audit_experiment))


def set_version_tags(name: str, version: str, tags: dict) -> None:
    c = client()
    for key, value in tags.items():
        c.set_model_version_tag(name, str(version), key, str(value))


def move_alias(
    cfg: DictConfig,
    alias: str,
    version: str,
    *,
    why: str,
    who: str | None = None,
    decision: str = "",
    figures: dict | None = None,
) -> str | None:
    """Give ``alias`` to ``version`` in one registry call and record the move; returns the previous holder.

    ``set_registered_model_alias`` reassigns an alias atomically, so exactly one version holds it
    at every moment. A move to the version that already holds it records nothing (idempotent).
    """
    name = cfg.mlflow.registered_model
    previous = alias_holder(name, alias)
    if previous == str(version):
        return previous
    client().set_registered_model_alias(name, alias, str(version))
    record_move(cfg, alias, previous, str(version), why=why, who=who, decision=decision, figures=figures)
    return previous


def record_move(
    cfg: DictConfig,
    alias: str,
    previous: str | None,
    version: str,
    *,
    why: str,
    who: str | None,
    decision: str,
    figures: dict | None,
) -> None:
    """One audit run per alias move, in the audit experiment (visible in the MLflow UI)."""
    c = client()
    exp = c.get_experiment_by_name(cfg.mlflow.audit_experiment)
    exp_id = exp.experiment_id if exp else c.create_experiment(cfg.mlflow.audit_experiment)
    who = who or getpass.getuser()
    when = datetime.now(UTC).isoformat(timespec="seconds")
    tags = {
        "audit.model": cfg.mlflow.registered_model,
        "audit.alias": alias,
        "audit.from_version": previous or "",
        "audit.to_version": version,
        "audit.who": who,
        "audit.why": why,
        "audit.decision": decision,
        "audit.time": when,
        "audit.figures": json.dumps(figures or {}, sort_keys=True),
        "mlflow.note.content": f"{alias}: v{previous or '-'} -> v{version} by {who}: {why}",
    }
    run = c.create_run(exp_id, run_name=f"{alias} v{previous or '-'}->v{version}", tags=tags)
    for key, value in (figures or {}).items():
        if isinstance(value, int | float):
            c.log_metric(run.info.run_id, key, float(value))
    c.set_terminated(run.info.run_id)
    log.info("%s: v%s -> v%s (%s, %s)", alias, previous or "-", version, who, why)


def history(cfg: DictConfig) -> list[dict]:
    """Every recorded alias move, oldest first."""
    c = client()
    exp = c.get_experiment_by_name(cfg.mlflow.audit_experiment)
    if exp is None:
        return []
    runs = c.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`audit.model` = '{cfg.mlflow.registered_model}'",
        order_by=["attributes.start_time ASC"],
        max_results=10000,
    )
    keys = ("alias", "from_version", "to_version", "who", "why", "decision", "time")
    return [{k: r.data.tags.get(f"audit.{k}", "") for k in keys} for r in runs]


def versions(cfg: DictConfig) -> list[dict]:
    """All versions of the registered model, newest first, with aliases and tags.

    Aliases are read with ``get_model_version``: ``search_model_versions`` may return none.
    """
    c = client()
    name = cfg.mlflow.registered_model
    try:
        found = c.search_model_versions(f"name='{name}'", max_results=10000)
    except MlflowException:
        return []
    rows = []
    for item in sorted(found, key=lambda v: int(v.version), reverse=True):
        full = c.get_model_version(name, item.version)
        rows.append(
            {
                "version": str(full.version),
                "aliases": sorted(full.aliases or []),
                "created": datetime.fromtimestamp(full.creation_timestamp / 1000, UTC).isoformat(
                    timespec="seconds"
                ),
                "run_id": full.run_id,
                "tags": dict(full.tags or {}),
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    """The registry as a fixed-width table for the terminal."""
    header = ["version", "aliases", "kind", "base", "decision", "anchor mAP50", "created", "run"]
    lines = [header]
    for row in rows:
        tags = row["tags"]
        lines.append(
            [
                row["version"],
                ",".join(row["aliases"]) or "-",
                tags.get("kind", "-"),
                tags.get("base_version", "-"),
                tags.get("decision", "-"),
                tags.get("eval.anchor_test.map50", "-"),
                row["created"],
                (row["run_id"] or "")[:12],
            ]
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(line, widths, strict=True)) for line in lines)
