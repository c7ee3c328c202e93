"""What every pipeline stage shares: the Hydra entry point, outputs, and the anchor's Ultralytics yaml."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from detloop.core.config import CONFIG_NAME, conf_dir, resolve_path
from detloop.core.errors import BadInput
from detloop.core.failures import report

log = logging.getLogger(__name__)


def hydra_entry(run: Callable[[DictConfig], dict]) -> Callable[[], None]:
    """A ``main()`` for ``python -m detloop.<stage> [key=value ...] [-m]`` that calls ``run(cfg)``.

    Bad input and a refused alias move exit 2 (nothing changed); a tracking store that is unreachable,
    goes away during the stage or refuses the user (MLflow HTTP 403/401) exits 3. Each is one message,
    no traceback (:func:`detloop.core.failures.report`).
    """
    import hydra

    @hydra.main(config_path=str(conf_dir()), config_name=CONFIG_NAME, version_base="1.3")
    def _main(cfg: DictConfig) -> float | None:
        try:
            result = run(cfg)
        except Exception as err:
            code = report(err, log.error)
            if code is None:
                raise
            sys.exit(code)
        objective = (result or {}).get("objective")
        return float(objective) if objective is not None else None

    def entry() -> None:
        # `mlflow run . -e <stage>` passes MLproject's empty `overrides` parameter as one empty argument
        # (''), which Hydra would refuse as an override: blank arguments carry no override, drop them
        sys.argv[1:] = [arg for arg in sys.argv[1:] if arg.strip()]
        _main()

    return entry


def stage_dir(cfg: DictConfig, stage: str) -> Path:
    path = resolve_path(cfg, "build") / stage
    path.mkdir(parents=True, exist_ok=True)
    return path


def multirun_job():
    """Hydra's config of this job when it runs as one job of a multirun (a sweep), else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return None
    return hc if hc.mode == RunMode.MULTIRUN else None


def job_dir() -> Path | None:
    """The job's own output folder when it runs as one job of a Hydra multirun (a sweep), else None."""
    hc = multirun_job()
    if hc is None:
        return None
    path = Path(str(hc.runtime.output_dir))
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise BadInput(f"{what} not found: {path}", [f"{path}: run the stage that writes it first"])
    return json.loads(path.read_text())
