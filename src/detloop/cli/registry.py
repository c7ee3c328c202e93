"""Commands on the MLflow Model Registry: the version table, the audit trail, promotion and rollback."""

from __future__ import annotations

import json

from detloop.cli.common import compose_args


def cmd_registry(args) -> int:
    from detloop.tracking import oversight, records, registry, runs, store

    cfg = compose_args(args)
    runs.setup(cfg)
    if args.add_webhook:
        hook = oversight.register_webhook(cfg, args.add_webhook)
        print(f"webhook {hook['name']} ({hook['id']}): {', '.join(hook['events'])} -> {hook['url']}")
        return 0
    if args.repair:
        changed = records.repair(cfg, args.repair)
        for key, (old, new) in changed.items():
            print(f"v{args.repair}: {key} {old!r} -> {new!r}")
        print(f"v{args.repair}: tags agree with its records" + ("" if changed else " (nothing to repair)"))
        return 0
    oversight.watch(cfg)
    if args.history:
        rows = registry.history(cfg)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for r in rows:
                print(format_move(r))
        return 0
    rows = registry.versions(cfg)
    for row in rows:
        proof = records.evidence(cfg, row["version"], row["tags"])
        row["trusted"] = {"kind": proof.kind, "decision": proof.decision, "edited": list(proof.edited)}
    warnings = oversight.warnings(cfg, rows)  # also added to each row's "warnings"
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
    elif not rows:
        print(f"no versions of {cfg.mlflow.registered_model} yet (run `dvc repro` or `make demo`)")
    else:
        print(f"registered model {cfg.mlflow.registered_model} @ {store.tracking_uri(cfg)}")
        print(registry.format_table(rows))
        for line in warnings:
            print(f"WARNING: {line}")
    return 0


def format_move(move: dict) -> str:
    """One audit record: time, alias, from -> to, who, decision, why (and forced / interrupted / refused marks;
    a move refused because another won, or by the server, says why)."""
    target = f"v{move['to_version']}" if move["to_version"] else "-"
    marks = "".join(
        [
            " [forced]" if move.get("forced") else "",
            " [outside detloop]" if move.get("external") else "",
            " [breaks a rule]" if move.get("external") and not move.get("allowed", True) else "",
            " [refused]" if move.get("refused") else "",
            f" [{move['state']}]" if move.get("state", "done") != "done" else "",
        ]
    )
    refusal = f" -- refused: {move['refusal']}" if move.get("refusal") else ""
    return (
        f"{move['time']}  {move['alias']:<10} v{move['from_version'] or '-'} -> {target}"
        f"  by {move['who']} ({move['decision']}){marks}: {move['why']}{refusal}"
    )


def cmd_promote(args) -> int:
    from detloop.team.access import require_manage
    from detloop.tracking import runs
    from detloop.tracking.promotion import promote_version

    cfg = compose_args(args)
    runs.setup(cfg)
    require_manage(cfg, f"detloop promote (a human decision on {args.alias})")  # a reviewer's, on a shared server
    result = promote_version(
        cfg, args.version, reviewer=args.reviewer, reason=args.reason, force=args.force, alias=args.alias
    )
    if not result["moved"]:
        print(f"{args.alias}: v{args.version} already holds it; nothing changed")
        return 0
    forced = " (forced)" if result["forced"] else ""
    print(f"{result['alias']}: v{result['from'] or '-'} -> v{result['to']}{forced} by {args.reviewer}: {args.reason}")
    if result["alias"] == "production" and result["from"]:
        print(f"v{result['from']} stays registered; undo with: detloop rollback --reason TEXT")
    return 0


def cmd_rollback(args) -> int:
    from detloop.team.access import require_manage
    from detloop.tracking import runs
    from detloop.tracking.promotion import rollback

    cfg = compose_args(args)
    runs.setup(cfg)
    require_manage(cfg, "detloop rollback (a human decision on production)")  # a reviewer's, on a shared server
    result = rollback(cfg, to=args.to, reviewer=args.reviewer, reason=args.reason)
    print(f"production: v{result['from']} -> v{result['to']} (rollback) by {result['reviewer']}: {result['reason']}")
    print(f"v{result['from']} is tagged rolled_back=true and stays registered")
    return 0
