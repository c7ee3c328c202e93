"""``detloop``: the operational commands. Each accepts Hydra ``key=value`` overrides.

Exit codes: 0 success; 2 bad input (nothing changed); 3 tracking store unreachable; 1 other failures.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from detloop.errors import BadInput, TrackingUnavailable

log = logging.getLogger("detloop")

OVERRIDES_HELP = "Hydra overrides, e.g. demo.seed=1 mlflow.registered_model=my-detector"


def _cfg(args):
    from detloop.config import compose

    return compose(args.overrides)


def cmd_demo_data(args) -> int:
    from detloop.demo_data import write_demo_data

    summary = write_demo_data(_cfg(args))
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


def cmd_anchor_import(args) -> int:
    from detloop.anchor import import_anchor

    summary = import_anchor(Path(args.path), _cfg(args), replace=args.replace)
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return 0


def cmd_registry(args) -> int:
    from detloop import registry, tracking

    cfg = _cfg(args)
    tracking.setup(cfg)
    if args.history:
        rows = registry.history(cfg)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for r in rows:
                print(f"{r['time']}  {r['alias']:<10} v{r['from_version'] or '-'} -> v{r['to_version']}"
                      f"  by {r['who']} ({r['decision']}): {r['why']}")  # fmt: skip
        return 0
    rows = registry.versions(cfg)
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
    elif not rows:
        print(f"no versions of {cfg.mlflow.registered_model} yet (run `dvc repro` or `make demo`)")
    else:
        print(f"registered model {cfg.mlflow.registered_model} @ {tracking.tracking_uri(cfg)}")
        print(registry.format_table(rows))
    return 0


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
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.set_defaults(func=cmd_registry)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BadInput as err:
        print(f"error: {err.render()}", file=sys.stderr)
        return BadInput.exit_code
    except TrackingUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
