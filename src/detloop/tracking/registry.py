"""The MLflow Model Registry as the promotion and rollback mechanism.

Registry stages are deprecated since MLflow 2.9, so the card's stages are aliases (``base``,
``staging``, ``production``). MLflow keeps no history of alias moves; every move is recorded as a
run in the audit experiment (who, why, from, to, figures), which the MLflow UI shows and
``detloop registry --history`` prints.

Many writers (a shared server): a move opens its audit run first, then goes ahead only if no other
detloop move of the alias is in flight ahead of it and the holder is still the one its caller decided
against (:mod:`detloop.tracking.inflight`); otherwise it is refused (:class:`MoveConflict`, exit 2), its
audit run closed as ``refused`` with the holder or mover named. :func:`reconcile` settles only moves
whose process died.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
from datetime import UTC, datetime

import mlflow
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig

from detloop.core import failures
from detloop.core.errors import MoveConflict, PermissionRefused
from detloop.tracking import inflight
from detloop.tracking.store import default_artifact_root

log = logging.getLogger(__name__)


def actor() -> str:
    """Who acts when nobody is named: the MLflow user on a server with auth, else the OS user."""
    return os.environ.get("MLFLOW_TRACKING_USERNAME") or getpass.getuser()


ALIASES = ("base", "staging", "production")
OUTCOME_TAG = "audit.outcome"  # refused: the move was refused before the alias call; duplicate: a record made twice
REFUSAL_TAG = "audit.refusal"  # why it was refused (names the holder or the mover)
UNREAD = object()  # move_alias(expected=...) not given: the holder read by the move itself


def client() -> mlflow.MlflowClient:
    return mlflow.MlflowClient()


def alias_holder(name: str, alias: str) -> str | None:
    """The version holding ``alias`` (as a string), or None."""
    try:
        return str(client().get_model_version_by_alias(name, alias).version)
    except MlflowException as err:
        if failures.is_refusal(err) or failures.is_unreachable(err):
            raise  # not "nobody holds it"
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
    with failures.acting(
        f"tagging version {version} of registered model {name}", needs=f"EDIT on registered model {name}"
    ):
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
    expected=UNREAD,
    version_tags: dict | None = None,
) -> str | None:
    """Give ``alias`` to ``version`` in one registry call and record the move; returns the previous holder.

    ``set_registered_model_alias`` reassigns an alias atomically, so exactly one version holds it
    at every moment. A move to the version that already holds it records nothing (idempotent).
    The audit run is opened (RUNNING) before the alias moves and finished after it: a process killed
    in between leaves a RUNNING record that :func:`reconcile` settles on the next move.

    Many writers: ``expected`` is the holder the caller's decision was based on (None = nobody; default:
    the holder read here). The move is refused with :class:`MoveConflict` (exit 2, nothing moved, the
    attempt recorded as ``refused``) when the holder is no longer ``expected`` or another detloop move of
    the alias is in flight (:mod:`detloop.tracking.inflight`); the message names the holder or the mover.
    ``version_tags`` are set on ``version`` once the move may go ahead, right before the alias call.
    Raises PermissionRefused / TrackingUnavailable (exit 3) naming the action when the server refuses
    the user or stops answering.
    """
    return _recorded_move(
        cfg,
        alias,
        str(version),
        why=why,
        who=who,
        decision=decision,
        figures=figures,
        tags=tags,
        expected=expected,
        version_tags=version_tags,
    )


def clear_alias(
    cfg: DictConfig, alias: str, *, why: str, who: str | None = None, decision: str = "", expected=UNREAD
) -> str | None:
    """Take ``alias`` away from its holder (recorded as a move to no version); returns the previous holder."""
    return _recorded_move(
        cfg, alias, "", why=why, who=who, decision=decision, figures=None, tags=None, expected=expected
    )


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
    expected=UNREAD,
    version_tags: dict | None = None,
) -> str | None:
    """Settle earlier interrupted moves, open the audit run, check nobody else moves, move (``version`` '' =
    remove) and close the run.

    Nothing is recorded when ``alias`` already is where it should be; returns the previous holder.
    A refused move (:class:`MoveConflict`, :class:`PermissionRefused`) has its audit run settled as
    ``refused``; a server gone away leaves it RUNNING for :func:`reconcile` (the process is dead by then).
    """
    name = cfg.mlflow.registered_model
    reconcile(cfg, alias)
    previous = alias_holder(name, alias)
    if previous == (version or None):
        return previous
    basis = previous if expected is UNREAD else (str(expected) if expected else None)
    owner = {inflight.OWNER_TAG: inflight.process_identity()}
    run_id = record_move(
        cfg,
        alias,
        previous,
        version,
        why=why,
        who=who,
        decision=decision,
        figures=figures,
        tags={**(tags or {}), **owner},
    )
    target = f"v{version}" if version else "no version"
    action = f"moving alias {alias} of registered model {name} to {target}"
    try:
        with failures.acting(f"checking for other moves before {action}", after="nothing moved"):
            _claim(cfg, alias, run_id, basis, version)
        if version_tags:
            set_version_tags(name, version, version_tags)
        needs = f"{'EDIT' if version else 'MANAGE'} on registered model {name}"
        unsure = f"whether the alias moved is settled by the next move of {alias} (detloop registry --history)"
        with failures.acting(action, needs=needs, after=unsure):
            if version:
                client().set_registered_model_alias(name, alias, version)
            else:
                client().delete_registered_model_alias(name, alias)
    except (MoveConflict, PermissionRefused) as err:
        _settle_refused(run_id, str(err))
        raise
    except BaseException:  # the server went away (or the process is stopped): the next reconcile settles it
        inflight.abandon(run_id)
        raise
    with failures.acting(
        f"closing the audit record of {action}", after=f"the alias moved; the next move of {alias} closes the record"
    ):
        client().set_terminated(run_id, "FINISHED")
    log.info(
        "%s: v%s -> %s (%s: %s)",
        alias,
        previous or "-",
        f"v{version}" if version else "-",
        who or actor(),
        why,
    )
    return previous


def _running(cfg: DictConfig, alias: str, externals: bool = False) -> list:
    """The RUNNING audit runs of detloop moves of ``alias`` (records of moves made outside detloop only if
    ``externals``: they are closed as soon as they are written, they never race)."""
    exp_id = audit_experiment_id(cfg, create=False)
    if exp_id is None:
        return []
    name = cfg.mlflow.registered_model
    query = f"tags.`audit.model` = '{name}' and tags.`audit.alias` = '{alias}' and attributes.status = 'RUNNING'"
    found = client().search_runs([exp_id], filter_string=query, max_results=1000)
    return [r for r in found if externals or r.data.tags.get("audit.external") != "true"]


def _lease(cfg: DictConfig) -> float:
    """How long a RUNNING move from another host counts as live (``promote.ui_moves.settle_seconds``)."""
    return float(cfg.promote.ui_moves.settle_seconds)


def _claim(cfg: DictConfig, alias: str, run_id: str, basis: str | None, version: str) -> None:
    """Let the move opened as audit run ``run_id`` go ahead, or raise MoveConflict naming the mover or the holder.

    It goes ahead when no other detloop move of ``alias`` is in flight ahead of it and the holder is still
    ``basis`` (what the caller's decision was based on).
    """
    name = cfg.mlflow.registered_model
    target = f"v{version}" if version else "removing it"
    rival = inflight.first_rival(client(), run_id, _running(cfg, alias), _lease(cfg))
    if rival is not None:
        raise MoveConflict(
            f"{alias} of {name}: {rival.describe()}; this move ({target}) was refused and nothing changed "
            "(see detloop registry --history, then decide again)"
        )
    holder = alias_holder(name, alias)
    if holder != basis:
        raise MoveConflict(
            f"{alias} of {name} changed since this command read it (v{basis or '-'}): v{holder or '-'} holds it now"
            f"{_given_by(cfg, alias, holder)}; this move ({target}) was refused and nothing changed "
            "(see detloop registry --history, then decide again)"
        )


def _given_by(cfg: DictConfig, alias: str, holder: str | None) -> str:
    """`` (given by WHO at TIME: WHY)`` from the newest recorded move of ``alias`` to ``holder`` ('' if none)."""
    done = [m for m in history(cfg) if m["alias"] == alias and m["state"] == "done"]
    last = next((m for m in reversed(done) if m["to_version"] == (holder or "")), None)
    return f" (given by {last['who']} at {last['time']}: {last['why']})" if last else ""


def recorded_elsewhere(cfg: DictConfig, alias: str, run_id: str, holder: str) -> bool:
    """For the record ``run_id`` of a move made outside detloop (still RUNNING, opened with the process tag
    :data:`inflight.OWNER_TAG`): True, and the record closed as a duplicate (hidden from :func:`history`),
    when another process records the same move at the same time or already did; False when it stands.
    """
    c = client()
    same = [
        r
        for r in _running(cfg, alias, externals=True)
        if r.data.tags.get("audit.external") == "true" and r.data.tags.get("audit.to_version") == (holder or "")
    ]
    duplicate = inflight.first_rival(c, run_id, same, _lease(cfg)) is not None
    if not duplicate:
        done = [m for m in history(cfg) if m["alias"] == alias and m["state"] == "done" and m["run_id"] != run_id]
        duplicate = bool(done) and done[-1]["to_version"] == (holder or "")
    if duplicate:
        c.set_tag(run_id, OUTCOME_TAG, "duplicate")
        c.set_terminated(run_id, "FAILED")
    return duplicate


def _settle_refused(run_id: str, text: str) -> None:
    """Close a refused move's audit run as ``refused`` with the reason (``detloop registry --history``)."""
    c = client()
    try:
        note = c.get_run(run_id).data.tags.get("mlflow.note.content", "")
        refusal = [RunTag(OUTCOME_TAG, "refused"), RunTag(REFUSAL_TAG, text[:4000])]
        c.log_batch(run_id, tags=[*refusal, RunTag("mlflow.note.content", f"{note}\n\nREFUSED: {text}"[:4000])])
        c.set_terminated(run_id, "FAILED")
    except Exception as err:  # the server went away or refuses this too: reconcile settles it (nothing moved)
        if failures.as_detloop_error(err) is None:
            raise
        log.warning("could not mark the refused move's audit run %s as refused: %s", run_id, err)


def audit_experiment_id(cfg: DictConfig, create: bool = True) -> str | None:
    """The audit experiment's id (created on first use, also when another process races to create it)."""
    from detloop.tracking.runs import get_or_create_experiment

    if not create:
        exp = client().get_experiment_by_name(cfg.mlflow.audit_experiment)
        return exp.experiment_id if exp else None
    return get_or_create_experiment(cfg.mlflow.audit_experiment, default_artifact_root(cfg))


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
    who = who or actor()
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
    audit = cfg.mlflow.audit_experiment
    with failures.acting(
        f"opening the audit record of moving alias {alias} of registered model {cfg.mlflow.registered_model}",
        needs=f"EDIT on experiment {audit}",
        after="nothing moved",
    ):
        exp_id = audit_experiment_id(cfg)
        run = c.create_run(exp_id, run_name=f"{alias} v{previous or '-'}->{target}", tags=all_tags)
    numbers = {k: float(v) for k, v in (figures or {}).items() if type(v) in (int, float)}
    if numbers:
        stamp = int(datetime.now(UTC).timestamp() * 1000)
        c.log_batch(run.info.run_id, metrics=[Metric(k, v, stamp, 0) for k, v in numbers.items()])
    return run.info.run_id


def reconcile(cfg: DictConfig, alias: str) -> None:
    """Settle audit runs of ``alias`` left RUNNING by a process killed during a move.

    The move happened exactly when the alias holder is the record's target: FINISHED then, else FAILED
    (shown as ``interrupted`` by :func:`history`). A move whose process still lives (this host: its pid;
    another host: opened less than ``promote.ui_moves.settle_seconds`` ago) is in flight and left alone;
    records without a process tag (older detloop) are settled at once. A user who may not edit the audit
    experiment leaves them for someone who may (warning).
    """
    pending = [
        r
        for r in _running(cfg, alias, externals=True)
        if inflight.OWNER_TAG not in r.data.tags or not inflight.owner_alive(r, _lease(cfg))
    ]
    if not pending:
        return
    c = client()
    holder = alias_holder(cfg.mlflow.registered_model, alias) or ""
    for run in pending:
        refused = run.data.tags.get(OUTCOME_TAG) == "refused"
        moved = run.data.tags.get("audit.to_version", "") == holder and not refused
        note = run.data.tags.get("mlflow.note.content", "")
        try:
            with failures.acting(
                f"settling the interrupted alias move {run.info.run_id}",
                needs=f"EDIT on experiment {cfg.mlflow.audit_experiment}",
            ):
                c.set_terminated(run.info.run_id, "FINISHED" if moved else "FAILED")
        except PermissionRefused as err:
            log.warning("interrupted alias move %s (%s) left open: %s", run.info.run_id, note, err)
            continue
        log.warning("interrupted alias move %s (%s): %s", run.info.run_id, note, "done" if moved else "not done")


def move_in_flight(cfg: DictConfig, alias: str, settle_seconds: float) -> bool:
    """True while a detloop move of ``alias`` is in flight: its audit run is RUNNING and its process lives
    (another host's, or an untagged one: opened less than ``settle_seconds`` ago)."""
    return any(inflight.owner_alive(r, settle_seconds) for r in _running(cfg, alias))


STATES = {"FINISHED": "done", "FAILED": "interrupted", "KILLED": "interrupted", "RUNNING": "pending"}


def _state(run) -> str:
    if run.data.tags.get(OUTCOME_TAG) == "refused" and run.info.status != "RUNNING":
        return "refused"
    return STATES.get(run.info.status, run.info.status.lower())


def history(cfg: DictConfig) -> list[dict]:
    """Every recorded alias move, oldest first.

    ``state`` is ``done`` for moves that happened, ``interrupted`` for moves that did not, ``refused``
    for moves refused before the alias call (another move won, the holder changed, the server refused
    the user; ``refusal`` says why) and ``pending`` for one in flight (or killed and not yet settled by
    :func:`reconcile`).
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
            "state": _state(r),
            "refusal": r.data.tags.get(REFUSAL_TAG, ""),
            "run_id": r.info.run_id,
        }
        for r in runs
        if r.data.tags.get(OUTCOME_TAG) != "duplicate"
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
    except MlflowException as err:
        if failures.is_refusal(err) or failures.is_unreachable(err):
            raise
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
