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
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig

from detloop.tracking.runs import default_artifact_root

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
    "Each version's description opens with its kind, gate decision and headline figures. Version tags: `kind` "
    "(base|finetune), `decision` (pass|review|reject|bootstrap), the headline gate figures (`gate.*`), "
    "`rollback_to` (the production version it replaced), `rolled_back`, `promoted_by`, `promote_reason` and "
    "`lineage.*` (git commit, data.dvc md5, config hash, run id). The rules trust the gate record "
    "(`gate/decision.json` in the version's run) and the training run's params, not the tags. Every alias move "
    "(who, when, why), also one made here in the UI, is a run in the experiment `{audit}`."
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
    tags: dict | None = None,
) -> str | None:
    """Give ``alias`` to ``version`` in one registry call and record the move; returns the previous holder.

    ``set_registered_model_alias`` reassigns an alias atomically, so exactly one version holds it
    at every moment. A move to the version that already holds it records nothing (idempotent).
    The audit run is opened (RUNNING) before the alias moves and finished after it: a process killed
    in between leaves a RUNNING record that :func:`reconcile` settles on the next move.
    """
    return _recorded_move(cfg, alias, str(version), why=why, who=who, decision=decision, figures=figures, tags=tags)


def clear_alias(cfg: DictConfig, alias: str, *, why: str, who: str | None = None, decision: str = "") -> str | None:
    """Take ``alias`` away from its holder (recorded as a move to no version); returns the previous holder."""
    return _recorded_move(cfg, alias, "", why=why, who=who, decision=decision, figures=None, tags=None)


def _recorded_move(
    cfg: DictConfig,
    alias: str,
    version: str,
    *,
    why: str,
    who: str | None,
    decision: str,
    figures: dict | None,
    tags: dict | None,
) -> str | None:
    """Settle earlier interrupted moves, open the audit run, move (``version`` '' = remove) and close the run.

    Nothing is recorded when ``alias`` already is where it should be; returns the previous holder.
    """
    name = cfg.mlflow.registered_model
    reconcile(cfg, alias)
    previous = alias_holder(name, alias)
    if previous == (version or None):
        return previous
    run_id = record_move(cfg, alias, previous, version, why=why, who=who, decision=decision, figures=figures, tags=tags)
    if version:
        client().set_registered_model_alias(name, alias, version)
    else:
        client().delete_registered_model_alias(name, alias)
    client().set_terminated(run_id, "FINISHED")
    log.info(
        "%s: v%s -> %s (%s: %s)",
        alias,
        previous or "-",
        f"v{version}" if version else "-",
        who or getpass.getuser(),
        why,
    )
    return previous


def audit_experiment_id(cfg: DictConfig, create: bool = True) -> str | None:
    """The audit experiment's id (created on first use, also when another process races to create it)."""
    c = client()
    exp = c.get_experiment_by_name(cfg.mlflow.audit_experiment)
    if exp is not None or not create:
        return exp.experiment_id if exp else None
    try:
        return c.create_experiment(cfg.mlflow.audit_experiment, artifact_location=default_artifact_root(cfg))
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return c.get_experiment_by_name(cfg.mlflow.audit_experiment).experiment_id


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
    tags: dict | None = None,
) -> str:
    """Open the audit run of one alias move (visible in the MLflow UI); returns its run id.

    The run stays RUNNING until the caller has moved the alias and terminates it. Numeric figures
    are logged as metrics; ``tags`` adds audit tags (e.g. ``audit.forced``). ``version`` '' = alias removed.
    """
    c = client()
    exp_id = audit_experiment_id(cfg)
    who = who or getpass.getuser()
    when = datetime.now(UTC).isoformat(timespec="seconds")
    target = f"v{version}" if version else "-"
    all_tags = {
        "audit.model": cfg.mlflow.registered_model,
        "audit.alias": alias,
        "audit.from_version": previous or "",
        "audit.to_version": version,
        "audit.who": who,
        "audit.why": why,
        "audit.decision": decision,
        "audit.time": when,
        "audit.figures": json.dumps(figures or {}, sort_keys=True),
        "mlflow.note.content": f"{alias}: v{previous or '-'} -> {target} by {who}: {why}",
        **{k: str(v) for k, v in (tags or {}).items()},
    }
    run = c.create_run(exp_id, run_name=f"{alias} v{previous or '-'}->{target}", tags=all_tags)
    numbers = {k: float(v) for k, v in (figures or {}).items() if type(v) in (int, float)}
    if numbers:
        stamp = int(datetime.now(UTC).timestamp() * 1000)
        c.log_batch(run.info.run_id, metrics=[Metric(k, v, stamp, 0) for k, v in numbers.items()])
    return run.info.run_id


def reconcile(cfg: DictConfig, alias: str) -> None:
    """Settle audit runs of ``alias`` left RUNNING by a process killed during a move.

    The move happened exactly when the alias holder is the record's target: FINISHED then, else FAILED
    (shown as ``interrupted`` by :func:`history`). A live mover that is settled early finishes its own run.
    """
    exp_id = audit_experiment_id(cfg, create=False)
    if exp_id is None:
        return
    c = client()
    name = cfg.mlflow.registered_model
    query = f"tags.`audit.model` = '{name}' and tags.`audit.alias` = '{alias}' and attributes.status = 'RUNNING'"
    pending = c.search_runs([exp_id], filter_string=query, max_results=1000)
    if not pending:
        return
    holder = alias_holder(name, alias) or ""
    for run in pending:
        moved = run.data.tags.get("audit.to_version", "") == holder
        c.set_terminated(run.info.run_id, "FINISHED" if moved else "FAILED")
        note = run.data.tags.get("mlflow.note.content", "")
        log.warning("interrupted alias move %s (%s): %s", run.info.run_id, note, "done" if moved else "not done")


def move_in_flight(cfg: DictConfig, alias: str, settle_seconds: float) -> bool:
    """True while an audit run of ``alias`` opened less than ``settle_seconds`` ago is still RUNNING."""
    exp_id = audit_experiment_id(cfg, create=False)
    if exp_id is None:
        return False
    since = int((datetime.now(UTC).timestamp() - settle_seconds) * 1000)
    query = (
        f"tags.`audit.model` = '{cfg.mlflow.registered_model}' and tags.`audit.alias` = '{alias}' "
        f"and attributes.status = 'RUNNING' and attributes.start_time > {since}"
    )
    return bool(client().search_runs([exp_id], filter_string=query, max_results=1))


STATES = {"FINISHED": "done", "FAILED": "interrupted", "KILLED": "interrupted", "RUNNING": "pending"}


def history(cfg: DictConfig) -> list[dict]:
    """Every recorded alias move, oldest first.

    ``state`` is ``done`` for moves that happened, ``interrupted`` for moves that did not, and
    ``pending`` for one in flight (or killed and not yet settled by :func:`reconcile`).
    """
    exp_id = audit_experiment_id(cfg, create=False)
    if exp_id is None:
        return []
    runs = client().search_runs(
        [exp_id],
        filter_string=f"tags.`audit.model` = '{cfg.mlflow.registered_model}'",
        order_by=["attributes.start_time ASC"],
        max_results=10000,
    )
    keys = ("alias", "from_version", "to_version", "who", "why", "decision", "time")
    return [
        {
            **{k: r.data.tags.get(f"audit.{k}", "") for k in keys},
            "forced": r.data.tags.get("audit.forced", "") == "true",
            "external": r.data.tags.get("audit.external", "") == "true",
            "allowed": r.data.tags.get("audit.allowed", "true") == "true",
            "refused": r.data.tags.get("audit.refused", "") == "true",
            "gate_status": r.data.tags.get("audit.gate_status", ""),
            "state": STATES.get(r.info.status, r.info.status.lower()),
        }
        for r in runs
    ]


# The gate's version tags shown as columns (figures are tagged ``gate.<gate>.<figure>``, see detloop.gate)
GATE1_DROP = "gate.regression.drop"  # Gate 1: anchor-test mAP50 drop vs the reference (points or %)
GATE2_RATE = "gate.new_samples.detection_rate"  # Gate 2: detection rate on the pool holdout


def gate_record(tags: dict) -> dict[str, str]:
    """A version's gate tags without the ``gate.`` prefix (decision, time, figures); {} if never gated."""
    return {k.removeprefix("gate."): v for k, v in sorted(tags.items()) if k.startswith("gate.")}


def versions(cfg: DictConfig) -> list[dict]:
    """All versions of the registered model, newest first, with aliases, tags and the gate record.

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
        tags = dict(full.tags or {})
        rows.append(
            {
                "version": str(full.version),
                "aliases": sorted(full.aliases or []),
                "created": datetime.fromtimestamp(full.creation_timestamp / 1000, UTC).isoformat(timespec="seconds"),
                "run_id": full.run_id,
                "decision": tags.get("decision", ""),
                "gate": gate_record(tags),
                "tags": tags,
            }
        )
    return rows


def _number(value: str | None, digits: int) -> str:
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return value or "-"


def _decision(tags: dict) -> str:
    """The decision tag plus what happened to the version since (forced, rolled back)."""
    marks = {"forced_promotion": "forced", "rolled_back": "rolled back"}
    shown = [f"({mark})" for key, mark in marks.items() if tags.get(key) == "true"]
    return " ".join([tags.get("decision", "-"), *shown])


def format_table(rows: list[dict]) -> str:
    """The registry as a fixed-width table for the terminal (Gate 1 drop, Gate 2 detection rate)."""
    header = [
        "version",
        "aliases",
        "kind",
        "base",
        "decision",
        "gate1 drop",
        "gate2 rate",
        "anchor mAP50",
        "created",
        "run",
    ]
    lines = [header]
    for row in rows:
        tags = row["tags"]
        lines.append(
            [
                row["version"],
                ",".join(row["aliases"]) or "-",
                tags.get("kind", "-"),
                tags.get("base_version", "-"),
                _decision(tags) + (" (tags edited!)" if row.get("trusted", {}).get("edited") else ""),
                _number(tags.get(GATE1_DROP), 2),
                _number(tags.get(GATE2_RATE), 3),
                tags.get("eval.anchor_test.map50", "-"),
                row["created"],
                (row["run_id"] or "")[:12],
            ]
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(line, widths, strict=True)) for line in lines)


def _model_versions(cfg: DictConfig) -> list:
    """Every version of the registered model (none when it does not exist yet)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    name = cfg.mlflow.registered_model
    try:
        return list(mlflow.MlflowClient().search_model_versions(f"name='{name}'", max_results=10000))
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return []
        raise


def last_finetune_from_registry(cfg: DictConfig) -> dict | None:
    """``{version, pool_size, created}`` of the newest fine-tune version of the registered model.

    Fine-tunes are the versions tagged ``kind=finetune``; their pool size is the tag ``pool.size``.
    None when the model or such versions do not exist. MLflow must be set up (tracking.setup).
    """
    name = cfg.mlflow.registered_model
    finetunes = [v for v in _model_versions(cfg) if (v.tags or {}).get("kind") == "finetune"]
    for version in sorted(finetunes, key=lambda v: int(v.version), reverse=True):
        size = (version.tags or {}).get("pool.size")
        if size is None or not str(size).isdigit():
            log.warning("%s version %s is a fine-tune without a pool.size tag; skipped", name, version.version)
            continue
        created = datetime.fromtimestamp(version.creation_timestamp / 1000, UTC)
        return {
            "version": str(version.version),
            "pool_size": int(size),
            "created": created.isoformat(timespec="seconds"),
        }
    return None


def last_base_from_registry(cfg: DictConfig) -> dict | None:
    """``{version, pool_size}`` of the newest ``kind=base`` version (a base without ``pool.size`` saw no pool)."""
    bases = [v for v in _model_versions(cfg) if (v.tags or {}).get("kind") == "base"]
    if not bases:
        return None
    newest = max(bases, key=lambda v: int(v.version))
    size = str((newest.tags or {}).get("pool.size", "0"))
    return {"version": str(newest.version), "pool_size": int(size) if size.isdigit() else 0}
