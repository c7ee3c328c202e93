"""The recipe search's Optuna sampler: a fixed first trial, then Optuna's TPE (``search.sampler=recipe``).

Hydra's Optuna sweeper instantiates it from ``conf/hydra/sweeper/sampler/recipe.yaml``. The first trial takes
the values in ``first`` (nested keys, e.g. ``{finetune: {train: {freeze: 0}}}``) for the parameters it names;
every other value, and every later trial, is the TPE sampler's.
"""

from __future__ import annotations

from collections.abc import Mapping

import optuna


def flatten(nested: Mapping, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in (nested or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


class FirstTrialTPE(optuna.samplers.TPESampler):
    def __init__(self, first: Mapping | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.first = flatten(first or {})

    def sample_independent(self, study, trial, param_name, param_distribution):
        if trial.number == 0 and param_name in self.first:
            value = self.first[param_name]
            try:
                inside = param_distribution._contains(param_distribution.to_internal_repr(value))
            except ValueError:  # not one of a choice's values
                inside = False
            if inside:
                return value
        return super().sample_independent(study, trial, param_name, param_distribution)
