"""What every pipeline stage shares: the Hydra entry point, outputs, and the anchor's Ultralytics yaml."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from detloop.core.config import CONFIG_NAME, conf_dir, resolve_path
from detloop.core.errors import BadInput, TrackingUnavailable

log = logging.getLogger(__name__)


def hydra_entry(run: Callable[[DictConfig], dict]) -> Callable[[], None]:
    """A ``main()`` for ``python -m detloop.<stage> [key=value ...] [-m]`` that calls ``run(cfg)``.

    Bad input exits 2 (nothing changed); an unreachable tracking store exits 3.
    """
    import hydra

    @hydra.main(config_path=str(conf_dir()), config_name=CONFIG_NAME, version_base="1.3")
    def _main(cfg: DictConfig) -> float | None:
        try:
            result = run(cfg)
        except BadInput as err:
            log.error("%s", err.render())
            sys.exit(BadInput.exit_code)
        except TrackingUnavailable as err:
            log.error("%s", err)
            sys.exit(3)
        objective = (result or {}).get("objective")
        return float(objective) if objective is not None else None

    return _main


def stage_dir(cfg: DictConfig, stage: str) -> Path:
    path = resolve_path(cfg, "build") / stage
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise BadInput(f"{what} not found: {path}", [f"{path}: run the stage that writes it first"])
    return json.loads(path.read_text())
