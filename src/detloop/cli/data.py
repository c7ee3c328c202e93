"""Commands on the data: demo data, anchor import, the inbox, file-based review and the pool status."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from detloop.cli.common import compose_args, split_overrides
from detloop.core.errors import BadInput
from detloop.tracking import registry


def cmd_demo_data(args) -> int:
    from detloop.data.demo import write_demo_data

    summary = write_demo_data(compose_args(args))
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


def cmd_anchor_import(args) -> int:
    from detloop.data.anchor import import_anchor

    summary = import_anchor(Path(args.path), compose_args(args), replace=args.replace)
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return 0


def cmd_inbox_add(args) -> int:
    from detloop.data.inbox import add_to_inbox

    labels = Path(args.labels) if args.labels else None
    result = add_to_inbox(Path(args.path), compose_args(args), labels=labels, note=args.note)
    counts = result["counts"]
    print(
        f"inbox {result['inbox']}: accepted {counts['accepted']} ({counts['with_labels']} with proposed labels), "
        f"refused {counts['refused']}; {counts['inbox_size']} sample(s) await review"
    )
    for item in result["refused"]:
        print(f"refused {item['path']}: {item['reason']}", file=sys.stderr)
    return BadInput.exit_code if result["refused"] else 0


def cmd_review(args) -> int:
    from detloop.data.review import inbox_ids, review

    ids, args.overrides = split_overrides(args.items)
    if args.decision in ("open", "commit", "annotate"):  # review in the FiftyOne App
        from detloop.cli.fiftyone_app import cmd_review_app

        return cmd_review_app(args, ids)
    cfg = compose_args(args)
    if args.all and ids:
        raise BadInput("give sample ids or --all, not both")
    if args.all:
        ids = inbox_ids(cfg)
        if not ids:
            raise BadInput("the inbox is empty: nothing to review")
    labels = Path(args.labels) if args.labels else None
    try:
        result = review(cfg, args.decision, ids, args.reviewer, labels_dir=labels, reason=args.reason)
    except RuntimeError as err:  # dvc add failed after a complete review
        print(f"error: {err}", file=sys.stderr)
        return 1
    verb = "accepted into the pool" if args.decision == "accept" else "rejected"
    print(f"{len(result['ids'])} sample(s) {verb} by {result['reviewer']}: {' '.join(result['ids'])}")
    print(f"pool: {result['pool_size']} verified samples; inbox: {result['inbox_size']} awaiting review")
    return 0


def cmd_pool_status(args) -> int:
    from detloop.data import pool
    from detloop.tracking import oversight, runs

    cfg = compose_args(args)
    runs.setup(cfg)
    oversight.watch(cfg)  # moves made in the MLflow UI are in the audit trail before anything reads it
    status = pool.trigger_status(cfg, registry.last_finetune_from_registry(cfg))
    retrain = pool.retrain_status(cfg, registry.last_base_from_registry(cfg))
    if args.json:
        print(json.dumps(pool.status_report(cfg, status, retrain), indent=2, sort_keys=True))
    else:
        print(pool.format_status(cfg, status, retrain))
    return 0
