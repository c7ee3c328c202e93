"""``detloop``: the operational commands. Each accepts Hydra ``key=value`` overrides.

Exit codes: 0 success; 2 bad input or an alias move refused because another one won (nothing changed);
3 tracking store unreachable or gone away, or the MLflow server refused the user; 4 the data change is
complete but its push to the DVC remote failed (owed, retried by the next command); 1 other failures.
"""

from __future__ import annotations

import argparse
import logging
import sys

from detloop.cli.common import OVERRIDES_HELP
from detloop.cli.data import (
    cmd_anchor_import,
    cmd_demo_data,
    cmd_inbox_add,
    cmd_pool_push,
    cmd_pool_status,
    cmd_review,
)
from detloop.cli.registry import cmd_promote, cmd_registry, cmd_rollback
from detloop.core.failures import report

log = logging.getLogger("detloop")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detloop", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo-data", help="write the embedded demo data set into data/ (deterministic)")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.set_defaults(func=cmd_demo_data)

    anchor = sub.add_parser("anchor", help="the permanent anchor dataset")
    anchor_sub = anchor.add_subparsers(dest="anchor_command", required=True)
    p = anchor_sub.add_parser(
        "import",
        help="validate an Ultralytics-format dataset (data.yaml + train/val/test) and make it the anchor",
    )
    p.add_argument("path", help="data.yaml, or the folder holding it")
    p.add_argument("--replace", action="store_true", help="replace an existing anchor dataset")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.set_defaults(func=cmd_anchor_import)

    p = sub.add_parser("registry", help="versions, aliases, gate results and lineage of the registered model")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--history", action="store_true", help="every alias move: who, when, from, to, why")
    p.add_argument(
        "--repair",
        metavar="VERSION",
        help="put VERSION's kind, decision and gate figure tags back as its records say (training run params, "
        "gate/decision.json), after someone edited them in the MLflow UI",
    )
    p.add_argument(
        "--add-webhook",
        metavar="URL",
        help="register an MLflow registry webhook (alias created/deleted) that sends to URL, e.g. "
        "http://HOST:PORT/registry-webhook of detloop serve; the secret comes from promote.ui_moves.webhook.secret_env",
    )
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.set_defaults(func=cmd_registry)
    _add_loop_parsers(sub)
    _add_decision_parsers(sub)
    from detloop.cli.production import add_production_parsers

    add_production_parsers(sub, OVERRIDES_HELP)
    from detloop.cli.fiftyone_app import add_inspect_parser

    add_inspect_parser(sub, OVERRIDES_HELP)
    from detloop.cli.team import add_team_parsers

    add_team_parsers(sub, OVERRIDES_HELP)
    from detloop.cli.annotation import add_annotation_parsers

    add_annotation_parsers(sub, OVERRIDES_HELP)
    return parser


def _add_loop_parsers(sub) -> None:
    """``inbox add``, ``review accept|reject`` and ``pool status``."""
    inbox = sub.add_parser("inbox", help="reported failures awaiting review")
    inbox_sub = inbox.add_subparsers(dest="inbox_command", required=True)
    p = inbox_sub.add_parser(
        "add",
        help="add reported failure images (optionally with proposed labels) to the inbox; "
        "exits 2 if any file is refused (the accepted ones are kept)",
    )
    p.add_argument("path", help="a folder of images (recursive), an image, or a .txt list of image paths")
    p.add_argument(
        "--labels",
        metavar="DIR",
        help="proposed labels as DIR/<image stem>.txt "
        "(default: beside the images, Ultralytics layout images/ -> labels/)",
    )
    p.add_argument("--note", help="a note recorded with every report of this batch")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.set_defaults(func=cmd_inbox_add)

    p = sub.add_parser("review", help="human review: accept inbox samples into the pool or reject them")
    p.add_argument(
        "decision",
        choices=["accept", "reject", "open", "commit", "annotate", "queue"],
        help="accept|reject IDs (file-based); open (App), commit (App tags -> pool), annotate (backend)",
    )
    p.description = (  # `review queue`: detloop.cli.review_queue
        "Human review of the inbox: accept|reject IDs (file-based; without IDs the inbox is listed in review-queue "
        "order), open|commit|annotate in the FiftyOne App, and queue: the inbox ordered by what each report would "
        "teach the model (the production model's uncertainty, novelty against the anchor in the detector's own "
        "features; near-duplicates of reviewed images last), with the reason per report."
    )
    p.add_argument("--json", action="store_true", help="queue: print the order as JSON (alone on stdout)")
    p.add_argument("--app", action="store_true", help="open: serve the FiftyOne App and print the URL")
    p.add_argument("--model", help="open: version / alias proposing labels (default fiftyone.review.model)")
    p.add_argument("items", nargs="*", metavar="ID", help="inbox sample ids (and key=value overrides)")
    p.add_argument("--all", action="store_true", help="every sample waiting in the inbox")
    p.add_argument("--reviewer", help="who verified the samples (required)")
    p.add_argument(
        "--labels", metavar="DIR", help="accept: corrected labels as DIR/<id>.txt (default: the proposed inbox labels)"
    )
    p.add_argument("--reason", help="reject: why (recorded in inbox/rejected.jsonl)")
    p.set_defaults(func=cmd_review)

    pool = sub.add_parser("pool", help="the human-verified fine-tune pool")
    pool_sub = pool.add_subparsers(dest="pool_command", required=True)
    p = pool_sub.add_parser(
        "status", help="pool size, split counts, new samples since the last fine-tune, each trigger's state"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.set_defaults(func=cmd_pool_status)
    p = pool_sub.add_parser(
        "push",
        help="push the current data version (and any owed one) to DVC's default remote now; exit 4 if it fails",
        description="`dvc push data.dvc` to DVC's default remote (dvc remote default), whatever pool.push.mode "
        "says, then any data version still owed from a failed push (from the local DVC cache). Exit 2 when the data "
        "is not tracked by DVC or there is no default remote; exit 4 when the push fails (it stays owed).",
    )
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="stop the push after SECONDS (default: no limit)")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.set_defaults(func=cmd_pool_push)


def _add_decision_parsers(sub) -> None:
    """``promote`` and ``rollback``: human decisions, recorded with who and why in the audit trail."""
    p = sub.add_parser(
        "promote",
        help="give a version an alias (default production) after human review; needs the gate's record",
        description="Give VERSION an alias in one atomic registry call, recorded with reviewer and reason. "
        "Refuses (exit 2) a version without a gate record (tag gate.decision) or one the gate rejected, "
        "unless --force (recorded as forced). 'base' only goes to a base model. Two people promoting at once: "
        "exactly one wins; the other is refused (exit 2, nothing moved, recorded as refused) and told who holds "
        "or is moving the alias. Exit 3 when the tracking server refuses the user (permission) or stops answering.",
    )
    p.add_argument("version", help="the registered model version, e.g. 3 (see detloop registry)")
    p.add_argument("--reviewer", required=True, help="who decides (recorded)")
    p.add_argument("--reason", required=True, help="why (recorded)")
    p.add_argument("--force", action="store_true", help="promote without a gate record or against a reject (recorded)")
    p.add_argument(
        "--alias",
        choices=["production", "staging", "base"],
        default="production",
        help="the alias to move (default: production)",
    )
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser(
        "rollback",
        help="give production back to the previous version (from the audit trail) or to --to VERSION",
        description="Walk back: production returns to the version that held it before the current one got it "
        "(two rollbacks go two versions back). The rolled-back version is tagged rolled_back=true. Exit 2 "
        "when there is no previous version.",
    )
    p.add_argument("--to", metavar="VERSION", help="a version that served in production before")
    p.add_argument("--reviewer", help="who decides (default: the current user)")
    p.add_argument("--reason", help="why (recorded)")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.set_defaults(func=cmd_rollback)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``, also taking ids and ``key=value`` overrides that follow the options.

    argparse alone stops filling a trailing ``nargs="*"`` positional once an option came between
    (``detloop review accept ID --reviewer me key=value``).
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    target = "items" if hasattr(args, "items") else "overrides"
    takes = hasattr(args, target) and not any(e.startswith("-") for e in extra)
    if extra and not (takes and (target == "items" or all("=" in e for e in extra))):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        setattr(args, target, [*getattr(args, target), *extra])
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parse(argv)
    try:
        return args.func(args)
    except Exception as err:  # detloop errors and MLflow refusals / a lost server: one message, no traceback
        code = report(err, lambda fmt, text: print(f"error: {text}", file=sys.stderr))
        if code is None:
            raise
        return code


if __name__ == "__main__":
    sys.exit(main())
