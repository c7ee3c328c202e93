"""Compose the Hydra config from ``conf/`` and resolve project paths.

Stages run as ``@hydra.main`` entry points; the console script and tests use :func:`compose`,
which reads the same files with the same overrides.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from detloop.core.env import in_project, project_root
from detloop.core.errors import BadInput

CONFIG_NAME = "config"


def conf_dir(root: Path | None = None) -> Path:
    return (root or project_root()) / "conf"


def compose(overrides: list[str] | tuple[str, ...] = (), root: Path | None = None) -> DictConfig:
    """The composed config for ``overrides`` (``key=value`` strings), outside of a Hydra app."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    folder = conf_dir(root)
    if not (folder / f"{CONFIG_NAME}.yaml").is_file():
        raise BadInput(
            f"no detloop config at {folder / (CONFIG_NAME + '.yaml')}",
            ["run detloop inside a detloop project (the folder with dvc.yaml and conf/) or set DETLOOP_ROOT"],
        )
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    with initialize_config_dir(config_dir=str(folder), version_base="1.3"):
        try:
            # blank arguments carry no override (`mlflow run` passes an empty `overrides` parameter as '')
            return hydra_compose(config_name=CONFIG_NAME, overrides=[o for o in overrides if o.strip()])
        except (HydraException, OmegaConfBaseException) as err:
            raise BadInput(f"bad config override in {list(overrides)}", [str(err).strip()]) from err


def resolve_path(cfg: DictConfig, key: str, root: Path | None = None) -> Path:
    """``cfg.paths.<key>`` as an absolute path (relative values are relative to the project root)."""
    value = OmegaConf.select(cfg, f"paths.{key}")
    if value is None:
        raise KeyError(f"config key paths.{key} is not set")
    return in_project(value, root)


def config_hash(node: DictConfig) -> str:
    """Short sha256 of a resolved config node: two runs with equal hashes had equal settings."""
    text = OmegaConf.to_yaml(node, resolve=True, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
