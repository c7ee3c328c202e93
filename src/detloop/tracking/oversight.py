"""Alias moves detloop did not make (the MLflow UI, the API): seen, recorded, checked.

MLflow keeps no history of alias moves, so detloop records its own in the audit experiment
(:mod:`detloop.tracking.registry`). Anyone with write access can still move an alias in the MLflow
UI. :func:`watch` compares every alias holder with the audit trail's last recorded move and records
each difference as an audit entry (``decision=external``: when it was seen, from, to, the target's
gate status from its trusted records, and who where MLflow says). Two paths call it:

* every detloop command that reads the registry (stages ``gate``, ``finetune``, ``promote``;
  ``detloop registry``, ``promote``, ``rollback``, ``pool status``, ``report``, ``monitor``,
  ``inspect``) and every ``serve`` poll;
* MLflow's registry webhooks (``model_version_alias.created`` / ``.deleted``, HMAC-signed, SQL
  tracking servers): ``detloop serve`` receives them at ``/registry-webhook`` (:func:`handle_delivery`)
  and records the move at once, with the delivery's time and id.

``promote.ui_moves.policy`` decides what happens to a move that breaks a rule (production to a version
without a passing gate record that never served before; ``base`` to a version that is not a base model;
``production`` removed): ``record`` keeps it and warns wherever it shows, ``enforce`` puts the previous
holder back (recorded as ``decision=revert``) and ``serve`` never swaps to it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
import time
from datetime import UTC, datetime

from omegaconf import DictConfig

from detloop.core.errors import BadInput, MoveConflict, PermissionRefused
from detloop.tracking import inflight, records, registry

log = logging.getLogger(__name__)

POLICIES = ("record", "enforce")
EXTERNAL = "external"  # audit decision of a move detloop did not make
REVERT = "revert"  # audit decision of detloop putting the previous holder back (policy enforce)
ALIAS_EVENTS = ("model_version_alias.created", "model_version_alias.deleted")


def policy(cfg: DictConfig) -> str:
    value = str(cfg.promote.ui_moves.policy)
    if value not in POLICIES:
        raise BadInput(
            f"promote.ui_moves.policy is {value!r}", [f"conf/promote: ui_moves.policy is one of {', '.join(POLICIES)}"]
        )
    return value


def served_before(moves: list[dict], version: str) -> bool:
    """True when a detloop move (not an external one) gave ``version`` production before."""
    return any(
        m["alias"] == "production" and m["to_version"] == version and m["decision"] not in (EXTERNAL, REVERT)
        for m in moves
        if m["state"] == "done"
    )


def check_target(cfg: DictConfig, alias: str, version: str | None, moves: list[dict]) -> tuple[bool, str, str]:
    """Whether the rules allow ``alias`` on ``version`` without detloop: ``(allowed, gate_status, why)``."""
    if not version:
        if alias == "production":
            return False, "-", "nothing holds production: exactly one version must serve"
        return True, "-", f"{alias} removed"
    proof = records.evidence(cfg, version)
    status = proof.gate_status
    if proof.tampered:
        return False, status, f"v{version}'s tags were edited ({proof.explain()})"
    if alias == "base":
        if proof.kind != "base":
            return False, status, f"v{version} is kind={proof.kind or '?'} (training run): only a base model takes base"
        return True, status, f"v{version} is a base model"
    if alias == "production":
        if proof.decision == "pass":
            return True, status, f"v{version} passed its gate"
        if served_before(moves, version):
            return True, status, f"v{version} served in production before (a rollback)"
        why = "has no gate record" if proof.decision is None else f"gate decision {proof.decision}"
        return False, status, f"v{version} {why}, never served in production, and was not promoted with detloop promote"
    return True, status, f"{alias} may hold any version"


def _recorded_holder(moves: list[dict], alias: str) -> str | None:
    """The holder the audit trail says ``alias`` has ('' = removed), None if it never recorded one."""
    done = [m for m in moves if m["alias"] == alias and m["state"] == "done"]
    return done[-1]["to_version"] if done else None


def watch(
    cfg: DictConfig, aliases=registry.ALIASES, *, seen_by: str = "detloop", event: dict | None = None
) -> list[dict]:
    """Record every alias move detloop did not make and apply the policy; returns what was found.

    A move in flight (:func:`registry.move_in_flight`: its process still runs, or, from another host, it
    opened less than ``promote.ui_moves.settle_seconds`` ago) is left alone this time. ``event`` is a
    verified webhook delivery (its time and id are recorded). Safe to call from many processes: a
    difference already recorded is not recorded twice, and of two processes putting a holder back (policy
    ``enforce``) one does it and the other leaves it. A user the server refuses to let write the audit trail
    gets a warning, not an error (read-only commands work).
    """
    rule = policy(cfg)
    name = cfg.mlflow.registered_model
    if registry.audit_experiment_id(cfg, create=False) is None and not any(
        registry.alias_holder(name, a) for a in aliases
    ):
        return []
    found = []
    moves = registry.history(cfg)
    for alias in aliases:
        if any(m["alias"] == alias and m["state"] == "pending" for m in moves):
            if registry.move_in_flight(cfg, alias, float(cfg.promote.ui_moves.settle_seconds)):
                continue
            registry.reconcile(cfg, alias)
            moves = registry.history(cfg)
        holder = registry.alias_holder(name, alias) or ""
        recorded = _recorded_holder(moves, alias)
        if holder == (recorded or ""):
            continue
        adopted = recorded is None  # the trail never recorded this alias: a registry detloop starts to watch
        try:
            entry = _record_external(cfg, alias, recorded or "", holder, moves, rule, seen_by, event, adopted)
        except PermissionRefused as err:  # e.g. a READ-only user's `detloop registry`: someone who may records it
            log.warning("%s moved outside detloop (v%s -> v%s), not recorded: %s", alias, recorded or "-", holder, err)
            continue
        found.extend([entry] if entry else [])
        moves = registry.history(cfg)
    return found


def _record_external(
    cfg: DictConfig,
    alias: str,
    recorded: str,
    holder: str,
    moves: list[dict],
    rule: str,
    seen_by: str,
    event,
    adopted: bool = False,
) -> dict | None:
    """Record one move made outside detloop and apply the policy; None when another process recorded it first."""
    allowed, status, why = check_target(cfg, alias, holder, moves)
    if adopted and not allowed:  # nothing to put back: the first holder the trail sees is kept, with a warning
        log.warning("WARNING: %s is held by v%s, which %s; the audit trail starts here", alias, holder, why)
        allowed, why = True, f"first holder the audit trail sees ({why})"
    when = (event or {}).get("timestamp") or datetime.now(UTC).isoformat(timespec="seconds")
    who = (event or {}).get("user") or "unknown (moved in the MLflow UI or API; MLflow does not say who)"
    refused = not allowed and rule == "enforce"
    tags = {
        "audit.external": "true",
        "audit.gate_status": status,
        "audit.allowed": str(allowed).lower(),
        "audit.policy": rule,
        "audit.seen_by": seen_by,
        "audit.refused": str(refused).lower(),
        inflight.OWNER_TAG: inflight.process_identity(),  # another process recording it at once: one record
    }
    if event:
        tags["audit.webhook_delivery"] = str(event.get("delivery_id", ""))
    shown = f"v{holder}" if holder else "-"
    note = f"moved outside detloop ({why})"
    run_id = registry.record_move(
        cfg, alias, recorded or None, holder, why=note, who=who, decision=EXTERNAL, figures=None, tags=tags
    )
    if registry.recorded_elsewhere(cfg, alias, run_id, holder):  # another process watching at the same time
        log.info("%s moved outside detloop to %s: recorded by another detloop process", alias, shown)
        return None
    registry.client().set_terminated(run_id, "FINISHED")  # it happened: the registry shows it
    entry = {
        "alias": alias,
        "from": recorded or None,
        "to": holder or None,
        "allowed": allowed,
        "gate_status": status,
        "why": why,
        "refused": refused,
        "time": when,
        "who": who,
    }
    if allowed:
        log.info("%s moved outside detloop: v%s -> %s (%s); recorded", alias, recorded or "-", shown, why)
        return entry
    if not refused:
        log.warning(
            "WARNING: %s moved outside detloop to %s, which breaks a rule: %s (promote.ui_moves.policy=record: kept)",
            alias,
            shown,
            why,
        )
        return entry
    back = recorded or ""
    log.warning("%s moved outside detloop to %s: refused (%s); putting v%s back", alias, shown, why, back or "-")
    reason = f"refused a move outside detloop to {shown}: {why} (promote.ui_moves.policy=enforce)"
    who_back = "detloop (promote.ui_moves.policy=enforce)"
    tags = {"audit.refused_version": holder}
    try:
        if back:
            registry.move_alias(
                cfg, alias, back, why=reason, who=who_back, decision=REVERT, tags=tags, expected=holder or None
            )
        else:
            registry.clear_alias(cfg, alias, why=reason, who=who_back, decision=REVERT, expected=holder or None)
    except MoveConflict as err:  # another process puts it back (or moves it) right now: that move stands
        log.warning("%s not put back here: %s", alias, err)
    if holder:
        registry.set_version_tags(cfg.mlflow.registered_model, holder, {f"refused.{alias}": when})
    return entry


def held_against_rules(cfg: DictConfig, alias: str, version: str) -> str | None:
    """Why ``version`` holds ``alias`` against a rule (kept by policy ``record``), or None when it does not."""
    done = [m for m in registry.history(cfg) if m["alias"] == alias and m["state"] == "done"]
    last = done[-1] if done else None
    if last and last["external"] and not last["allowed"] and last["to_version"] == str(version):
        return f"v{version} holds {alias} through a move made outside detloop that breaks a rule ({last['why']})"
    return None


def may_serve(cfg: DictConfig, alias: str, version: str) -> tuple[bool, str]:
    """Whether ``serve`` may swap to ``version`` holding ``alias`` (always true under policy ``record``)."""
    if alias != "production":
        return True, ""
    allowed, _, why = check_target(cfg, alias, version, registry.history(cfg))
    if allowed:
        return True, why
    if policy(cfg) == "record":
        log.warning("WARNING: serving v%s although %s (promote.ui_moves.policy=record)", version, why)
        return True, why
    return False, why


# --- MLflow registry webhooks -------------------------------------------------------------------


def webhook_secret(cfg: DictConfig) -> str | None:
    """The shared HMAC secret, from the environment variable ``promote.ui_moves.webhook.secret_env``."""
    return os.environ.get(str(cfg.promote.ui_moves.webhook.secret_env)) or None


def verify(secret: str, headers: dict, body: bytes, max_age: float) -> dict:
    """Check an MLflow webhook delivery's HMAC signature and age; returns the parsed payload.

    MLflow signs ``<delivery id>.<unix timestamp>.<body>`` with HMAC-SHA256 and sends
    ``X-MLflow-Signature: v1,<base64>``. Raises ValueError with what is wrong.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    delivery, stamp = lower.get("x-mlflow-delivery-id"), lower.get("x-mlflow-timestamp")
    signature = lower.get("x-mlflow-signature", "")
    if not delivery or not stamp or not signature:
        raise ValueError("missing X-MLflow-Delivery-Id, X-MLflow-Timestamp or X-MLflow-Signature header")
    if not stamp.isdigit() or abs(time.time() - int(stamp)) > max_age:
        raise ValueError(f"X-MLflow-Timestamp {stamp!r} is not within {max_age:.0f} s of now (replay?)")
    digest = hmac.new(secret.encode(), f"{delivery}.{stamp}.{body.decode('utf-8', 'replace')}".encode(), hashlib.sha256)
    expected = "v1," + base64.b64encode(digest.digest()).decode()
    if not hmac.compare_digest(expected, signature):
        raise ValueError("X-MLflow-Signature does not match the body (wrong secret or altered delivery)")
    try:
        payload = json.loads(body)
    except ValueError as err:
        raise ValueError(f"the body is not JSON: {err}") from err
    return {**payload, "delivery_id": delivery}


def handle_delivery(cfg: DictConfig, headers: dict, body: bytes) -> tuple[int, dict]:
    """One webhook delivery: ``(HTTP status, answer)``. Alias events of our model run :func:`watch`."""
    secret = webhook_secret(cfg)
    if secret is None:
        env = cfg.promote.ui_moves.webhook.secret_env
        return 503, {"error": f"registry webhooks are not configured: set {env} (the webhook's secret)"}
    try:
        payload = verify(secret, headers, body, float(cfg.promote.ui_moves.webhook.max_age_seconds))
    except ValueError as err:
        log.warning("registry webhook refused: %s", err)
        return 401, {"error": str(err)}
    event = f"{payload.get('entity')}.{payload.get('action')}"
    data = payload.get("data") or {}
    log.info("registry webhook %s: %s %s v%s", payload["delivery_id"], event, data.get("alias"), data.get("version"))
    if event not in ALIAS_EVENTS or data.get("name") != cfg.mlflow.registered_model:
        return 200, {"ignored": event}
    alias = data.get("alias")
    if alias not in registry.ALIASES:
        return 200, {"ignored": f"alias {alias!r}"}
    found = watch(cfg, (alias,), seen_by="webhook", event={**payload, "timestamp": payload.get("timestamp")})
    return 200, {"event": event, "alias": alias, "version": data.get("version"), "recorded": found}


def register_webhook(cfg: DictConfig, url: str) -> dict:
    """Create (or update) the MLflow webhook that sends alias events to ``url``; needs a SQL tracking server."""
    from mlflow.exceptions import MlflowException

    secret = webhook_secret(cfg)
    env = cfg.promote.ui_moves.webhook.secret_env
    if secret is None:
        raise BadInput(f"{env} is not set", [f"export {env}=<a long random secret>; serve needs the same value"])
    c = registry.client()
    # MLflow: letters, digits, '.', '_', '-'; starts and ends with a letter or digit; under 63 characters
    name = re.sub(r"[^A-Za-z0-9._-]", "-", f"detloop-{cfg.mlflow.registered_model}")[:62].rstrip("._-")
    try:
        existing = [w for w in c.list_webhooks() if w.name == name]
        if existing:
            hook = c.update_webhook(existing[0].webhook_id, url=url, events=list(ALIAS_EVENTS), secret=secret)
        else:
            hook = c.create_webhook(
                name,
                url,
                events=list(ALIAS_EVENTS),
                secret=secret,
                description="detloop: alias moves made outside detloop are recorded and checked",
            )
    except MlflowException as err:
        raise BadInput(
            f"the tracking server refused the webhook: {err.message}",
            [
                "webhooks need an MLflow 3 tracking server on a SQL database (mlflow server --backend-store-uri ...)",
                "for a local receiver the server needs MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true and "
                "MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https",
            ],
        ) from err
    return {"id": hook.webhook_id, "name": hook.name, "url": hook.url, "events": [str(e) for e in hook.events]}


def warnings(cfg: DictConfig, rows: list[dict]) -> list[str]:
    """What ``detloop registry`` warns about: edited tags and alias holders that break a rule.

    ``rows`` are :func:`registry.versions` rows with ``trusted`` (see :mod:`records`); each row also
    gets its own ``warnings`` list.
    """
    moves = registry.history(cfg)
    out = []
    for row in rows:
        row["warnings"] = [f"tags edited outside detloop: {e}" for e in row.get("trusted", {}).get("edited", [])]
        for alias in row["aliases"]:
            last = [m for m in moves if m["alias"] == alias and m["state"] == "done"]
            if last and last[-1]["external"] and not last[-1]["allowed"] and last[-1]["to_version"] == row["version"]:
                row["warnings"].append(
                    f"holds {alias} through a move made outside detloop at {last[-1]['time']} that breaks a rule "
                    f"({last[-1]['why']}); kept because promote.ui_moves.policy=record"
                )
        out.extend(f"v{row['version']}: {w}" for w in row["warnings"])
    return out
