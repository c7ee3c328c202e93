"""What every command shares: Hydra overrides after the arguments, composed into the config."""

from __future__ import annotations

OVERRIDES_HELP = "Hydra overrides, e.g. demo.seed=1 mlflow.registered_model=my-detector"


def compose_args(args):
    from detloop.core.config import compose

    return compose(args.overrides)


def split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """Free arguments as (ids, ``key=value`` overrides)."""
    return [i for i in items if "=" not in i], [i for i in items if "=" in i]
