"""Stage ``trigger``: the clock and the monitor's flag as a file DVC can see.

``dvc repro`` sees files, not time passing or a flag the monitor raised. This stage runs on every
``dvc repro`` (``always_changed: true``) and writes ``build/trigger/state.json``
(:func:`detloop.data.pool.trigger_state`): the current schedule period when the schedule strategy
is on, and a hash of the monitor's flags when the performance strategy is on. It holds no time, so
its content, and with it stage ``mix`` that depends on it, changes only when a period boundary
passes or a new flag is raised. It decides nothing: ``mix`` applies the policy.

Cheap on purpose (it runs on every ``dvc repro``): no MLflow, no Ultralytics.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from detloop.core.stage import hydra_entry, stage_dir, write_json
from detloop.data import pool

log = logging.getLogger(__name__)

STAGE = "trigger"


def run(cfg: DictConfig) -> dict:
    """Write ``build/trigger/state.json`` and return it."""
    state = pool.trigger_state(cfg)
    write_json(stage_dir(cfg, STAGE) / "state.json", state)
    log.info("trigger state: %s", state)
    return state


main = hydra_entry(run)

if __name__ == "__main__":
    main()
