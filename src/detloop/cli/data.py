"""Commands on the data: demo data, anchor import, the inbox, file-based review, the pool status and push.

Commands that change the pool push the new data version to DVC's default remote afterwards
(:mod:`detloop.data.remote`); exit code 4 when that push failed (the change itself is complete and kept).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from detloop.cli.common import compose_args, split_overrides
from detloop.core.errors import BadInput


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
    from detloop.data.remote import data_change

    labels = Path(args.labels) if args.labels else None
    cfg = compose_args(args)
    with data_change(cfg, "inbox add", push_after=False) as change:  # the next review's push carries the inbox
        result = add_to_inbox(Path(args.path), cfg, labels=labels, note=args.note)
    counts = result["counts"]
    print(
        f"inbox {result['inbox']}: accepted {counts['accepted']} ({counts['with_labels']} with proposed labels), "
        f"refused {counts['refused']}; {counts['inbox_size']} sample(s) await review"
    )
    for item in result["refused"]:
        print(f"refused {item['path']}: {item['reason']}", file=sys.stderr)
    for line in change.lines():
        print(line)
    return BadInput.exit_code if result["refused"] else 0


def cmd_review(args) -> int:
    from detloop.data.remote import data_change
    from detloop.data.review import inbox_ids, review

    ids, args.overrides = split_overrides(args.items)
    if args.decision in ("open", "commit", "annotate"):  # review in the FiftyOne App
        from detloop.cli.fiftyone_app import cmd_review_app

        return cmd_review_app(args, ids)
    if args.decision == "queue":  # the inbox ordered by what it would teach the model
        from detloop.cli.review_queue import cmd_review_queue

        return cmd_review_queue(args, ids)
    cfg = compose_args(args)
    if not ids and not args.all:  # nothing named: list the inbox in the review queue's order, then refuse
        from detloop.cli.review_queue import print_listing

        print_listing(cfg)
    if args.all and ids:
        raise BadInput("give sample ids or --all, not both")
    if args.all:
        ids = inbox_ids(cfg)
        if not ids:
            raise BadInput("the inbox is empty: nothing to review")
    labels = Path(args.labels) if args.labels else None
    try:
        with data_change(cfg, f"review {args.decision}") as change:  # rejections are review records too: pushed
            result = review(cfg, args.decision, ids, args.reviewer, labels_dir=labels, reason=args.reason)
    except RuntimeError as err:  # dvc add failed after a complete review
        print(f"error: {err}", file=sys.stderr)
        return 1
    verb = "accepted into the pool" if args.decision == "accept" else "rejected"
    print(f"{len(result['ids'])} sample(s) {verb} by {result['reviewer']}: {' '.join(result['ids'])}")
    print(f"pool: {result['pool_size']} verified samples; inbox: {result['inbox_size']} awaiting review")
    for line in change.lines():
        print(line)
    return change.exit_code()


def cmd_pool_status(args) -> int:
    from detloop.data import pool, remote
    from detloop.tracking import oversight, runs, versions

    cfg = compose_args(args)
    pushed = remote.remote_status(cfg)  # retries an owed push first
    runs.setup(cfg)
    oversight.watch(cfg)  # moves made in the MLflow UI are in the audit trail before anything reads it
    registered = versions.model_versions(cfg, set_up=True)
    status = pool.trigger_status(cfg, versions.last_finetune(cfg, registered))
    retrain = pool.retrain_status(cfg, versions.last_base(cfg, registered))
    if args.json:
        print(json.dumps({**pool.status_report(cfg, status, retrain), "remote": pushed}, indent=2, sort_keys=True))
    else:
        print("\n".join([pool.format_status(cfg, status, retrain), *remote.format_remote_status(pushed)]))
    return 0


def cmd_pool_push(args) -> int:
    """``detloop pool push``: push the current data version (and any owed one) to DVC's default remote now."""
    from detloop.data import remote

    if args.timeout is not None and not args.timeout > 0:
        raise BadInput(f"--timeout {args.timeout:g}: seconds > 0 (leave it out for no limit)")
    cfg = compose_args(args)
    plan = remote.plan_push(cfg, required="detloop pool push")
    result = remote.push(plan, "pool push", args.timeout)
    print(result.summary())
    if result.still_owed:
        print(f"still owed: {' '.join(result.still_owed)}", file=sys.stderr)
    return 0 if result.ok else remote.PUSH_FAILED_EXIT
