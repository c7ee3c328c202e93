"""``detloop inspect`` and ``detloop review open|commit|annotate``: the FiftyOne commands.

Each resolves registry versions / aliases into weights (MLflow), connects FiftyOne to the project's
database and calls the FiftyOne functions of :mod:`detloop.fiftyone`, all in this process.
"""

from __future__ import annotations

import contextlib
import json
import os
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
    p.add_argument(
        "--view",
        metavar="NAME",
        help="label-check (gate.label_check.view): save the pool's view of the samples whose labels the models "
        "contradict most (the newest label check: build/gate, else build/finetune), by score; needs --set pool",
    )
    p.add_argument(
        "--json", action="store_true", help="print the result as JSON (alone on stdout; the report on stderr)"
    )
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args) -> int:
    from detloop.core.config import compose
    from detloop.fiftyone.db import connect, stop_project_mongod
    from detloop.fiftyone.inspection import inspect_sets, launch_app, resolve_models
    from detloop.fiftyone.load import check_sets

    cfg = compose(args.overrides)
    if args.stop_db:
        print("stopped the project's mongod" if stop_project_mongod(cfg) else "the project's mongod is not running")
        return 0
    sets = check_sets(args.sets or list(cfg.fiftyone.sets))
    specs = [] if args.no_predictions else (args.models or list(cfg.fiftyone.models))
    with stdout_to_stderr() if args.json else contextlib.nullcontext():
        models = resolve_models(cfg, specs)
        fo = connect(cfg)
        result, datasets = inspect_sets(cfg, sets, models, evaluate=not args.no_evaluate)
        if args.view:  # the label check's saved view (detloop.fiftyone.label_check)
            from detloop.fiftyone.label_check import save_view

            result["view"] = save_view(cfg, args.view, datasets)
        result["database_uri"] = fo.config.database_uri
        if args.app:
            launch_app(cfg, datasets[sets[0]] if sets else None)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    return 0


@contextlib.contextmanager
def stdout_to_stderr():
    """What would go to stdout while the block runs goes to stderr (``--json``: stdout is the JSON alone).

    Both ``sys.stdout`` (``print``) and file descriptor 1: FiftyOne's log handler keeps the stdout it
    found when it was imported, and processes started meanwhile (the App server) inherit the descriptor.
    """
    for stream in (sys.stdout, sys.__stdout__):
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no descriptor 1 (embedded): sys.stdout alone
        saved = None
    else:
        os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        for stream in (sys.stdout, sys.__stdout__):
            with contextlib.suppress(Exception):
                stream.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def cmd_review_app(args, ids: list[str]) -> int:
    """``detloop review open|commit|annotate`` (the FiftyOne App review)."""
    from detloop.core.config import compose

    if ids:
        raise BadInput(
            f"review {args.decision} takes no sample ids (got {' '.join(ids)})",
            ["tag samples in the App; `detloop review accept ID...` is the file-based review"],
        )
    cfg = compose(args.overrides)
    if args.decision == "commit" and not (args.reviewer or "").strip():
        raise BadInput("--reviewer: required (who verified these samples); reviews are recorded by name")
    from detloop.fiftyone import queue as review_queue
    from detloop.fiftyone import review
    from detloop.fiftyone.db import connect
    from detloop.fiftyone.inspection import launch_app, resolve_models

    if args.decision == "open":
        models = resolve_models(cfg, [getattr(args, "model", None) or str(cfg.fiftyone.review.model)])
        connect(cfg)
        _, dataset = review.open_review(cfg, models)
        dataset = review_queue.saved_view(dataset)  # the App opens on the inbox in review-queue order
        if getattr(args, "app", False):
            launch_app(cfg, dataset)
    elif args.decision == "commit":
        from detloop.data.remote import data_change

        connect(cfg)
        with data_change(cfg, "review commit") as change:  # one push for the whole commit, after it
            result = review.commit(cfg, args.reviewer)
        print(
            f"{len(result['accepted'])} sample(s) accepted into the pool and {len(result['rejected'])} rejected "
            f"by {result['reviewer']}; {result['waiting_in_app']} untagged sample(s) wait in the inbox"
        )
        if result.get("annotations"):
            loaded = result["annotations"]
            print(f"edits loaded from {loaded['backend']}; submitted there (verified): {len(loaded['submitted'])}")
        for kind, found in result["finished_interrupted"].items():
            if found:
                print(f"finished an interrupted review ({kind}): {' '.join(found)}", file=sys.stderr)
        for line in change.lines():
            print(line)
        return change.exit_code()
    else:
        target = review.annotation_target(cfg)  # a server that does not answer or refuses the key: before FiftyOne
        connect(cfg)
        sent = review.request_annotation(cfg, review.review_dataset(cfg), target)
        if sent["replaced"] is not None:
            submitted = len(sent["replaced"]["submitted"])
            print(f"the previous run's edits loaded ({submitted} submitted: tagged verified); its project deleted")
        print(f"annotation run {sent['key']}: {sent['samples']} report(s) sent to {sent['backend']}")
        if "url" in sent:
            print(
                f"  {sent['url']}  (login and API key: {sent['credentials']}); fix the boxes, Submit each report you "
                "verified (Skip or leave the others), then: detloop review commit --reviewer NAME"
            )
    return 0
