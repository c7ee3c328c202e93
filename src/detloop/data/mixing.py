"""The fine-tune data set by the document's replay rules (the replay ratio table, its seed, the draw).

Every pool train sample plus a random replay sample of anchor train, sized by the ratio table
(``conf/mix``: fewer new samples need more old data; 5x from 500 on) and capped at ``max_old``."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from detloop.core.config import resolve_path
from detloop.core.errors import BadInput
from detloop.data import pool
from detloop.data.datasets import anchor_images
from detloop.data.manifest import MANIFEST, manifest_hash

log = logging.getLogger(__name__)


def replay_multiplier(n_new: int, ratios: Mapping[int, int]) -> int:
    """The ratio-table multiplier for ``n_new`` pool-train samples (largest threshold <= n_new)."""
    table = sorted((int(k), int(v)) for k, v in ratios.items())
    if not table:
        raise BadInput("mix.ratios is empty", ["conf/mix: the replay ratio table needs at least one row"])
    multiplier = table[0][1]
    for threshold, value in table:
        if n_new >= threshold:
            multiplier = value
    return multiplier


def replay_size(n_new: int, ratios: Mapping[int, int], max_old: int) -> int:
    """How many anchor samples to replay: ``min(multiplier * n_new, max_old)``."""
    return min(replay_multiplier(n_new, ratios) * n_new, int(max_old))


def replay_seed(base_seed: int, pool_manifest_sha256: str) -> int:
    """A fresh draw per pool version, the same draw for the same pool version."""
    digest = hashlib.sha256(f"{base_seed}:{pool_manifest_sha256}".encode()).hexdigest()
    return int(digest[:8], 16)


def draw_replay(images: list[Path], size: int, seed: int) -> list[Path]:
    """``size`` distinct anchor images, drawn uniformly with ``seed`` (kept in anchor order)."""
    if size > len(images):
        size = len(images)
    picks = np.random.default_rng(seed).choice(len(images), size=size, replace=False)
    return [images[i] for i in sorted(picks.tolist())]


def relative_paths(paths: list[Path], root: Path) -> list[str]:
    """Each path resolved, relative to ``root`` when inside it (else absolute), as ``Path.resolve`` gives.

    Folders are resolved once each (a mix lists thousands of files in a few folders); a file that is
    itself a symbolic link is resolved on its own.
    """
    folders: dict[Path, Path] = {}
    out = []
    for p in paths:
        folder = folders.get(p.parent)
        if folder is None:
            folder = folders[p.parent] = p.parent.resolve()
        full = folder / p.name
        if os.path.islink(full):
            full = full.resolve()
        try:
            out.append(full.relative_to(root).as_posix())
        except ValueError:  # data outside the project: keep the absolute path
            out.append(str(full))
    return out


def build_mix(cfg: DictConfig, trigger: pool.TriggerStatus) -> dict:
    """The mix as lists of image paths plus its record (pure apart from reading the data folders)."""
    anchor = resolve_path(cfg, "anchor")
    new_train = pool.pool_samples(cfg, "train")
    new_val = pool.pool_samples(cfg, "val")
    old_train = anchor_images(anchor, "train")
    old_val = anchor_images(anchor, "val")
    if not new_train:
        pool_dir = resolve_path(cfg, "pool")
        raise BadInput("nothing to fine-tune on", [f"{pool_dir}: no verified pool samples in split train"])
    wanted = replay_size(len(new_train), cfg.mix.ratios, cfg.mix.max_old)
    if not old_train or wanted <= 0:
        raise BadInput(
            "refusing to mix: no old data (never fine-tune on new data alone)",
            [
                f"{anchor / 'images' / 'train'}: {len(old_train)} anchor train images; "
                f"conf/mix ratios/max_old give {wanted} replay samples"
            ],
        )
    pool_sha = manifest_hash(resolve_path(cfg, "pool") / MANIFEST)
    seed = replay_seed(int(cfg.mix.seed), pool_sha)
    replay = draw_replay(old_train, wanted, seed)
    if len(replay) < wanted:
        log.warning("anchor train has %d images; the ratio table asks for %d replay samples", len(old_train), wanted)
    record = {
        "triggered": trigger.triggered,
        "forced": trigger.forced,
        "trigger": trigger.message,
        "trigger_reasons": list(trigger.reasons),
        "pool_size": trigger.pool_size,
        "new_samples": trigger.new_samples,
        "pool_manifest_sha256": pool_sha,
        "new_train": len(new_train),
        "new_val": len(new_val),
        "multiplier": replay_multiplier(len(new_train), cfg.mix.ratios),
        "old_wanted": wanted,
        "old_train": len(replay),
        "anchor_val": len(old_val),
        "seed": seed,
        "ratios": {str(k): int(v) for k, v in OmegaConf.to_container(cfg.mix.ratios).items()},
        "max_old": int(cfg.mix.max_old),
    }
    return {"record": record, "train": new_train + replay, "val": old_val + new_val}


def retrain_key(cfg: DictConfig, retrain: dict) -> dict:
    """The retrain stage's input: constant while no retrain is due, so pool additions don't rerun it."""
    if not retrain["due"]:
        return {"due": False, "threshold": retrain["threshold"]}
    last = retrain["last_base"] or {"version": None, "pool_size": 0}
    return {
        "due": True,
        "forced": retrain["forced"],
        "threshold": retrain["threshold"],
        "pool_size": retrain["pool_size"],
        "pool_manifest_sha256": manifest_hash(resolve_path(cfg, "pool") / MANIFEST),
        "since_base_version": last["version"],
        "since_pool_size": last["pool_size"],
    }


def reweight(train: list[str], pool_dir: Path, root: Path, scale: float, pool_repeat: int, seed: int) -> dict:
    """The mix's train list as a recipe uses it: ``scale`` of the replayed anchor pages (a seeded subset,
    at least one: never new data alone) and every pool page listed ``pool_repeat`` times.

    ``train`` holds the mix stage's lines (relative to ``root`` or absolute); pool pages are those under
    ``pool_dir``. Returns ``{"train": lines, "pool": n, "replay": n, "replay_kept": n}``.
    """
    problems = []
    if not 0.0 < float(scale) <= 1.0:
        problems.append(f"finetune.replay.scale: expected a share in (0, 1], got {scale!r}")
    if int(pool_repeat) != pool_repeat or int(pool_repeat) < 1:
        problems.append(f"finetune.replay.pool_repeat: expected an int >= 1, got {pool_repeat!r}")
    if problems:
        raise BadInput("bad fine-tune replay settings", problems)
    pool_root = pool_dir.resolve()

    def in_pool(line: str) -> bool:
        path = Path(line) if Path(line).is_absolute() else root / line
        return path.resolve().is_relative_to(pool_root)

    new = [ln for ln in train if in_pool(ln)]
    old = [ln for ln in train if not in_pool(ln)]
    if not old:
        raise BadInput("refusing to train: the mix holds no replayed anchor pages (never new data alone)")
    keep = max(1, round(len(old) * float(scale)))
    picks = sorted(np.random.default_rng(seed).choice(len(old), size=keep, replace=False).tolist())
    replay = [old[i] for i in picks]
    return {
        "train": new * int(pool_repeat) + replay,
        "pool": len(new),
        "replay": len(old),
        "replay_kept": len(replay),
    }
