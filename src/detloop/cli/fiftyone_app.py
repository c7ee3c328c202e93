"""``detloop inspect`` and ``detloop review open|commit|annotate``: the FiftyOne commands.

These run in the ``detloop`` process only what needs MLflow (turning versions and aliases into
weights); the FiftyOne work runs in a child process (:mod:`detloop.fiftyone.job`).
"""

from __future__ import annotations

import json
import sys

from detloop.core.errors import BadInput

APP_REVIEW = ("open", "commit", "annotate")  # `detloop review` decisions handled in FiftyOne


def add_inspect_parser(sub, overrides_help: str) -> None:
    p = sub.add_parser(
        "inspect",
        help="load anchor splits, pool and inbox with model predictions into FiftyOne; evaluate; App",
        description="Build persistent FiftyOne datasets (<prefix>-anchor-test, -pool, -inbox, ...) with ground "
        "truth and the predictions of registry versions / aliases (field predictions_v<N>), evaluate each "
        "version (eval key eval_v<N>, mAP, classification report) and optionally serve the App on 127.0.0.1.",
    )
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        metavar="SET",
        help="anchor-train|anchor-val|anchor-test|pool|inbox (repeatable; default fiftyone.sets)",
    )
    p.add_argument(
        "--model",
        dest="models",
        action="append",
        metavar="SPEC",
        help="registry version (7), alias (production) or local .pt (repeatable; default fiftyone.models)",
    )
    p.add_argument("--no-predictions", action="store_true", help="load ground truth only")
    p.add_argument("--no-evaluate", action="store_true", help="skip evaluate_detections")
    p.add_argument("--app", action="store_true", help="serve the App on fiftyone.app.address:port and print the URL")
    p.add_argument("--stop-db", action="store_true", help="stop the project's mongod and exit")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args) -> int:
    from detloop.core.config import compose
    from detloop.fiftyone.job import resolve_models, run_job

    cfg = compose(args.overrides)
    if args.stop_db:
        from detloop.fiftyone.db import stop_project_mongod

        print("stopped the project's mongod" if stop_project_mongod(cfg) else "the project's mongod is not running")
        return 0
    specs = [] if args.no_predictions else (args.models or list(cfg.fiftyone.models))
    job = {
        "action": "inspect",
        "overrides": list(args.overrides),
        "sets": args.sets or list(cfg.fiftyone.sets),
        "models": resolve_models(cfg, specs),
        "evaluate": not args.no_evaluate,
        "app": args.app,
    }
    result = run_job(job)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def cmd_review_app(args, ids: list[str]) -> int:
    """``detloop review open|commit|annotate`` (the FiftyOne App review)."""
    from detloop.core.config import compose
    from detloop.fiftyone.job import resolve_models, run_job

    if ids:
        raise BadInput(
            f"review {args.decision} takes no sample ids (got {' '.join(ids)})",
            ["tag samples in the App; `detloop review accept ID...` is the file-based review"],
        )
    cfg = compose(args.overrides)
    job = {
        "action": f"review-{args.decision}" if args.decision != "annotate" else "annotate",
        "overrides": list(args.overrides),
        "reviewer": args.reviewer,
        "app": bool(getattr(args, "app", False)),
    }
    if args.decision == "commit" and not (args.reviewer or "").strip():
        raise BadInput("--reviewer: required (who verified these samples); reviews are recorded by name")
    if args.decision == "open":
        job["models"] = resolve_models(cfg, [getattr(args, "model", None) or str(cfg.fiftyone.review.model)])
    result = run_job(job)
    if args.decision == "commit":
        print(
            f"{len(result['accepted'])} sample(s) accepted into the pool and {len(result['rejected'])} rejected "
            f"by {result['reviewer']}; {result['waiting_in_app']} untagged sample(s) wait in the inbox"
        )
        for kind, found in result["finished_interrupted"].items():
            if found:
                print(f"finished an interrupted review ({kind}): {' '.join(found)}", file=sys.stderr)
    elif args.decision == "annotate":
        print(f"annotation run {result['anno_key']} sent to {cfg.fiftyone.review.annotation.backend}")
    return 0
