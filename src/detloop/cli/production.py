"""The production commands of ``detloop``: ``serve``, ``report``, ``monitor`` and ``abset``.

Exit codes as for every detloop command (0 success, 2 bad input with nothing changed, 3 tracking
store unreachable); ``detloop monitor`` exits 1 when an alert fired, so cron and CI can act on it.
"""

from __future__ import annotations

import json
from pathlib import Path

from detloop.cli.common import compose_args

ALERT_EXIT = 1


def cmd_serve(args) -> int:
    from detloop.production.app import serve

    return serve(compose_args(args), host=args.host, port=args.port)


def cmd_report(args) -> int:
    from detloop.production.reports import report_image

    cfg = compose_args(args)
    result = report_image(cfg, Path(args.image), note=args.note)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(
            f"reported {args.image} as {result['id']}: v{result['model_version']} detected {result['detections']} "
            f"object(s), {result['labels']} proposed as labels; {result['inbox_size']} sample(s) await review"
        )
    return 0


def cmd_monitor(args) -> int:
    from detloop.production import monitor, monitor_rules

    cfg = compose_args(args)
    window = monitor_rules.resolve_window(cfg, since=args.since, until=args.until, window_days=args.window_days)
    result = monitor.run(
        cfg, window, raise_flag=True if args.raise_trigger else None, to_mlflow=False if args.no_mlflow else None
    )
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    else:
        print(monitor_rules.format_result(result))
    return ALERT_EXIT if result["alerts"] else 0


def cmd_abset_build(args) -> int:
    from detloop.production.abset import build, format_build

    cfg = compose_args(args)
    result = build(cfg, size=args.size, seed=args.seed, days=args.days)
    print(json.dumps(result, indent=2, sort_keys=True) if args.json else format_build(result, cfg))
    return 0


def cmd_abset_review(args) -> int:
    """``detloop review`` with the inbox and pool paths pointed at the A/B folders."""
    from detloop.cli.common import split_overrides
    from detloop.cli.data import cmd_review
    from detloop.core.config import compose
    from detloop.production.abset import folders, review_overrides

    _, overrides = split_overrides(args.items)
    cfg = compose(overrides)
    args.items = [*args.items, *review_overrides(cfg)]
    code = cmd_review(args)
    pending, verified = folders(cfg)
    print(
        f"(here the pool is the verified A/B set {verified}, the inbox the drawn samples in {pending}; "
        f"the gate reads it with gate.ab.data={verified})"
    )
    return code


def add_production_parsers(sub, overrides_help: str) -> None:
    """``serve``, ``report``, ``monitor`` and ``abset build|review``."""
    p = sub.add_parser(
        "serve",
        help="serve the production model over HTTP (MLflow scoring protocol), "
        "log every request, take failure reports; follows promotions without a restart",
    )
    p.add_argument("--host", help="interface (default serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (default serve.port, 8080)")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "report",
        help="report a failed image: it goes to the inbox with the production model's "
        "prediction as proposed labels; exits 2 when refused (duplicate, leakage, bad image)",
    )
    p.add_argument("image", help="the image the model got wrong")
    p.add_argument("--note", help="what went wrong (recorded with the report)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "monitor",
        help="production metrics over the prediction log vs their baselines; exits 1 on an alert",
        description="Detection rate per field (over the images expected to show it), average confidence and "
        "latency of the monitored version vs its own baseline and the previous production version's, failure "
        "reports per week (thresholds and baselines in conf/monitor). Logs to MLflow with monitor.json and "
        "monitor.png (the figures across the window); exits 1 when an alert fires, 0 otherwise.",
    )
    p.add_argument("--since", help="window start, ISO date or date-time (UTC when no zone)")
    p.add_argument("--until", help="window end (default: now)")
    p.add_argument(
        "--window-days", type=float, help="window length in days before --until (default monitor.window_days)"
    )
    p.add_argument(
        "--raise-trigger",
        action="store_true",
        help="on an accuracy alert, raise the loop's performance "
        "trigger (trigger.performance_flag); monitor.trigger.raise=true does it always",
    )
    p.add_argument("--no-mlflow", action="store_true", help="do not log this run to MLflow")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.set_defaults(func=cmd_monitor)

    abset = sub.add_parser("abset", help="Gate 3: labelled production samples for the A/B comparison")
    abset_sub = abset.add_subparsers(dest="abset_command", required=True)
    p = abset_sub.add_parser(
        "build",
        help="draw production images from the prediction log, with the served "
        "prediction as proposed labels, into the A/B review folder (serve.abset.inbox)",
    )
    p.add_argument("--size", type=int, help="images to draw (default serve.abset.size = gate.ab.size)")
    p.add_argument("--seed", type=int, help="the draw's seed (default serve.abset.seed)")
    p.add_argument("--days", type=float, help="draw from the last N days only (default: the whole log)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.set_defaults(func=cmd_abset_build)

    p = abset_sub.add_parser(
        "review",
        help="accept drawn samples (with corrected labels) into the verified A/B "
        "set that gate.ab.data reads, or reject them",
    )
    p.add_argument("decision", choices=["accept", "reject"])
    p.add_argument("items", nargs="*", metavar="ID", help="sample ids (and key=value overrides)")
    p.add_argument("--all", action="store_true", help="every sample waiting for review")
    p.add_argument("--reviewer", help="who verified the samples (required)")
    p.add_argument(
        "--labels", metavar="DIR", help="accept: corrected labels as DIR/<id>.txt (default: the proposed ones)"
    )
    p.add_argument("--reason", help="reject: why")
    p.set_defaults(func=cmd_abset_review)
