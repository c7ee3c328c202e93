"""The fine-tune recipe search's rules: its space, its objective, and the next recipe to try.

The search (stage ``search``, :mod:`detloop.training.search`) is a Hydra sweep of the ``finetune`` stage
with the Optuna sweeper (``hydra-optuna-sweeper``). Its space is ``search.space``: fine-tune keys
(``search.space.train.*`` for ``finetune.train.*``, ``search.space.replay.*`` for ``finetune.replay.*``)
mapped to the sweeper's expressions (``choice(0, 10)``,
``interval(0.001, 0.02)``, ``tag(log, interval(...))``, ``range(10, 31, step=10)``). Keys that would
break a rule are refused: the starting point (always the ``base`` alias), the serving thresholds, the
seed and the device. Each trial is gated by the same evaluator as every candidate; its objective is
the Gate 2 detection rate when every other gate passes, and that rate minus 1 otherwise, so any trial
that keeps the anchor ranks above every trial that does not.
"""

from __future__ import annotations

from collections.abc import Mapping

from omegaconf import DictConfig

from detloop.core.errors import BadInput

# the fine-tune keys a trial may change (Ultralytics train() arguments and how the mix is used)
SEARCHABLE = ("finetune.train.", "finetune.replay.")
# train() arguments that are not part of a recipe: determinism, hardware, bookkeeping
FIXED = {"seed", "deterministic", "device", "workers", "plots", "val", "verbose", "amp"}
RATE = "gate.new_samples.detection_rate"


def space(cfg: DictConfig) -> dict[str, str]:
    """``search.space`` validated: every key a recipe key, every value a sweeper expression."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    problems, out = [], {}
    for group, keys in (cfg.search.space or {}).items():
        if not isinstance(keys, Mapping) or f"finetune.{group}." not in SEARCHABLE:
            problems.append(
                f"search.space.{group}: only the groups train (finetune.train.*) and replay (finetune.replay.*) "
                "can be searched; the starting point (always the base alias) and the thresholds stay fixed"
            )
            continue
        for name, expr in keys.items():
            key, expr, where = f"finetune.{group}.{name}", str(expr), f"search.space.{group}.{name}"
            if name in FIXED:
                problems.append(f"{where}: {', '.join(sorted(FIXED))} are not part of a recipe; they stay fixed")
                continue
            if name not in cfg.finetune[group]:
                problems.append(f"{where}: conf/finetune has no key {key}")
                continue
            _check(parser, key, expr, where, problems, out)
    if not out and not problems:
        problems.append("search.space: empty; name at least one fine-tune key to search")
    if problems:
        raise BadInput("the recipe search's space is not valid (conf/search)", problems)
    return out


def _check(parser, key: str, expr: str, where: str, problems: list[str], out: dict[str, str]) -> None:
    """Parse one expression as the sweeper will; a valid sweep goes to ``out``, a problem names ``where``."""
    try:
        override = parser.parse_overrides([f"{key}={expr}"])[0]
    except Exception as err:  # hydra's parser error names the position in the expression
        problems.append(f"{where}: {expr!r} is not a sweeper expression ({str(err).splitlines()[0]})")
        return
    if not override.is_sweep_override():
        problems.append(f"{where}: {expr!r} is one value; give a range, e.g. choice(0, 10) or interval(0.001, 0.02)")
        return
    out[key] = expr


def objective(record: dict) -> float | None:
    """A gated trial's score: the Gate 2 rate when every other gate passes, else that rate minus 1."""
    rate = (record.get("figures") or {}).get(RATE)
    if rate is None:
        return None
    others = [g.get("decision") for key, g in (record.get("gates") or {}).items() if key != "new_samples"]
    return float(rate) if all(d == "pass" for d in others) else float(rate) - 1.0


def due(record: dict) -> tuple[bool, str]:
    """Whether a fine-tune's gate record calls for the search: Gate 2 did not pass."""
    if record.get("skipped"):
        return False, f"no fine-tune candidate ({record.get('reason', 'skipped')})"
    gate2 = (record.get("gates") or {}).get("new_samples", {}).get("decision")
    version = (record.get("candidate") or {}).get("version")
    if gate2 == "pass":
        return False, f"v{version} passed Gate 2: nothing to search for"
    return True, f"v{version} did not pass Gate 2 (new samples: {gate2})"


def _bounds(expr: str, key: str) -> list:
    """The values a sweeper expression can take at its ends (choice: all; interval/range: low, high)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    value = OverridesParser.create().parse_overrides([f"{key}={expr}"])[0].value()
    if isinstance(value, ChoiceSweep):
        return list(value.list)
    if isinstance(value, IntervalSweep):
        return [value.start, value.end]
    if isinstance(value, RangeSweep):
        return [value.start, value.stop - (value.step or 1)]
    return []


def next_recipe(cfg: DictConfig) -> dict[str, object]:
    """The next recipe to try within the space: the guide's answer to a Gate 2 failure, "increase
    training", as one step: the backbone freed as far as the bounds allow and lr0 x10 (capped by its
    bound); every other searched key keeps its configured value (moved inside its bounds if outside)."""
    current = {"finetune.train." + k: v for k, v in cfg.finetune.train.items()}
    current.update({"finetune.replay." + k: v for k, v in cfg.finetune.replay.items()})
    out: dict[str, object] = {}
    for key, expr in space(cfg).items():
        values = _bounds(expr, key)
        numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        if not numbers:
            continue
        low, high = min(numbers), max(numbers)
        now = current.get(key)
        name = key.rsplit(".", 1)[-1]
        if name == "freeze":
            out[key] = low
        elif name == "lr0" and isinstance(now, int | float):
            out[key] = min(high, max(low, float(now) * 10))
        elif isinstance(now, int | float) and not isinstance(now, bool):
            if _is_choice(expr, key):
                out[key] = now if now in values else min(numbers, key=lambda v: abs(v - now))
            else:
                out[key] = min(high, max(low, now))
    return out


def _is_choice(expr: str, key: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep

    return isinstance(OverridesParser.create().parse_overrides([f"{key}={expr}"])[0].value(), ChoiceSweep)


def sweep_command(cfg: DictConfig) -> str:
    """The shell command that runs the configured search by hand (the stage runs the same sweep)."""
    import shlex

    args = [*sweeper_arguments(cfg), *(f"{k}={v}" for k, v in space(cfg).items())]
    return " ".join(["python -m detloop.finetune -m", *map(shlex.quote, args)])


def sweeper_arguments(cfg: DictConfig) -> list[str]:
    """Hydra overrides selecting the Optuna sweeper as ``conf/search`` configures it."""
    s = cfg.search
    return [
        "hydra/sweeper=optuna",
        f"hydra/sweeper/sampler={s.sampler}",
        "hydra.sweeper.direction=maximize",
        f"hydra.sweeper.n_trials={int(s.trials)}",
        "hydra.sweeper.n_jobs=1" if not s.launcher else f"hydra.sweeper.n_jobs={int(s.parallel)}",
        f"hydra.sweeper.sampler.seed={int(s.seed)}",
        *([f"hydra.sweeper.sampler.first={nested(next_recipe(cfg))}"] if str(s.sampler) == "recipe" else []),
        *([f"hydra/launcher={s.launcher}"] if s.launcher else []),
    ]


def nested(flat: dict[str, object]) -> str:
    """``{'a.b.c': 1}`` as a Hydra override dict: ``{a: {b: {c: 1}}}`` (dotted keys would not parse)."""
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value

    def text(node) -> str:
        if isinstance(node, dict):
            return "{" + ", ".join(f"{k}: {text(v)}" for k, v in node.items()) + "}"
        return repr(node) if isinstance(node, str) else str(node)

    return text(tree)


def check_mode(cfg: DictConfig) -> str:
    """``search.mode`` and ``search.trials`` validated (BadInput naming the key)."""
    mode = str(cfg.search.mode)
    if mode not in ("off", "suggest", "run"):
        raise BadInput(f"search.mode={mode!r} is not off, suggest or run", ["conf/search/default.yaml: mode"])
    if int(cfg.search.trials) < 1:
        raise BadInput(
            f"search.trials={cfg.search.trials!r}: the budget must be at least 1 trial",
            ["conf/search/default.yaml: trials"],
        )
    return mode
