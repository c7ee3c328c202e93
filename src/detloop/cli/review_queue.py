"""``detloop review queue``: the inbox in the order of what each report would teach the model, with why.

The order comes from :func:`detloop.fiftyone.queue.review_queue` (the production model's uncertainty,
novelty against the anchor in the detector's own features, near-duplicates of reviewed images last)
and is saved; ``detloop review accept|reject`` without ids lists the inbox in that saved order, and
``detloop review open`` stores it in the App (saved view ``by-value``).
"""

from __future__ import annotations

import contextlib
import json
import sys

from detloop.core.errors import BadInput

LISTED = 30  # reports listed when review accept|reject names none


def cmd_review_queue(args, ids: list[str]) -> int:
    """Compute, print (``--json``: JSON alone on stdout) and save the review queue."""
    from detloop.core.config import compose

    if ids:
        raise BadInput(
            f"review queue takes no sample ids (got {' '.join(ids)})", ["it orders every report in the inbox"]
        )
    cfg = compose(args.overrides)
    from detloop.cli.fiftyone_app import stdout_to_stderr
    from detloop.fiftyone.inspection import resolve_models
    from detloop.fiftyone.queue import queue_path, review_queue

    with stdout_to_stderr() if args.json else contextlib.nullcontext():
        model = resolve_models(cfg, [args.model or str(cfg.fiftyone.review.model)])[0]
        result = review_queue(cfg, model)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    print(format_queue(result))
    print(f"saved to {queue_path(cfg)}; review in this order (detloop review accept|reject ID ..., or review open)")
    return 0


def format_queue(result: dict) -> str:
    """One line per report: rank, id, score and the reason."""
    counts = result["counts"]
    head = (
        f"review queue: {counts['inbox']} report(s), {counts['near_duplicates']} near-duplicate(s) of reviewed "
        f"images last; model {result['model'].get('label')} (embedding {result['model']['embedding']})"
    )
    if not result["items"]:
        return head + "\nthe inbox is empty"
    lines = [head, f"{'rank':>4}  {'id':<20} reason"]
    lines += [f"{item['rank']:>4}  {item['id']:<20} {item['reason']}" for item in result["items"]]
    return "\n".join(lines)


def print_listing(cfg) -> None:
    """The waiting inbox in the saved queue's order (to stderr): what ``review accept|reject`` can name."""
    from detloop.fiftyone.queue import listing

    rows, unranked = listing(cfg)
    if not rows:
        return
    print(f"{len(rows)} report(s) wait in the inbox, most to teach the model first:", file=sys.stderr)
    for row in rows[:LISTED]:
        rank = row.get("rank")
        reason = row.get("reason") or "not ranked yet"
        print(f"  {rank if rank is not None else '-':>4}  {row['id']:<20} {reason}", file=sys.stderr)
    if len(rows) > LISTED:
        print(f"  ... and {len(rows) - LISTED} more (detloop review queue lists them all)", file=sys.stderr)
    if unranked:
        print(f"  ({len(unranked)} not ranked yet: run detloop review queue)", file=sys.stderr)
