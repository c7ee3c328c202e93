"""The recipe search: a gated Optuna sweep of the fine-tune when the guide's recipe does not pass Gate 2.

:func:`run_trials` launches ``python -m detloop.finetune -m`` with the Optuna sweeper over ``search.space``
(:mod:`detloop.evaluation.recipes`) in its own process, as a user would from the shell. Every trial starts
from the ``base`` alias on the mix (with replay: ``finetune.replay.scale`` is never 0), registers its
version, is gated against ``production`` by the same evaluator (the sweep's job in :mod:`detloop.finetune`)
and returns the objective to the sampler. The trials are the children of the sweep's MLflow parent run.
:func:`collect` reads them back from MLflow (params, gate figures, decisions); :func:`best` picks the best
passing one; :func:`write_report` puts the comparison (table + plot) in the parent run and the best run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from omegaconf import DictConfig

from detloop.core.env import project_root
from detloop.evaluation import recipes
from detloop.tracking import registry, runs
from detloop.tracking.sweep import PARENT_FILE, SWEEP_JOB_TAG

log = logging.getLogger(__name__)

RECIPE_KEYS = (
    "finetune.train.freeze",
    "finetune.train.lr0",
    "finetune.train.epochs",
    "finetune.replay.scale",
    "finetune.replay.pool_repeat",
    "finetune.train.imgsz",
)


class SearchFailed(RuntimeError):
    """The sweep process failed (exit 1, one message with its log's last lines; nothing is staged)."""

    exit_code = 1


def run_trials(cfg: DictConfig, folder: Path, overrides: list[str]) -> dict:
    """Run the sweep into ``folder`` (emptied first); returns the parent run's record. ``overrides`` are the
    calling stage's own (so the trials see the same configuration, e.g. ``paths.*`` or ``mlflow=server``)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    passed = [o for o in overrides if not o.lstrip("+~").startswith(("search.", "hydra"))]
    command = [
        sys.executable,
        "-m",
        "detloop.finetune",
        "-m",
        *recipes.sweeper_arguments(cfg),
        f"hydra.sweeper.study_name=recipe-search-{folder.name}",
        f"hydra.sweep.dir={folder}",
        *[f"{k}={v}" for k, v in recipes.space(cfg).items()],
        *passed,
    ]
    log.info("recipe search: %d trial(s): %s", int(cfg.search.trials), " ".join(command[2:]))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(project_root() / "src"), os.environ.get("PYTHONPATH")])),
    }
    with (folder / "sweep.log").open("w") as out:
        done = subprocess.run(command, cwd=project_root(), env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = (folder / "sweep.log").read_text(errors="replace").splitlines()[-15:]
        raise SearchFailed(
            f"the recipe search's sweep exited with {done.returncode} (log: {folder / 'sweep.log'}):\n"
            + "\n".join(tail)
        )
    parent = folder / PARENT_FILE
    if not parent.is_file():
        raise SearchFailed(f"the recipe search wrote no parent run ({parent} missing); log: {folder / 'sweep.log'}")
    return json.loads(parent.read_text())


def collect(cfg: DictConfig, parent_run_id: str, folder: Path) -> list[dict]:
    """Every trial of the sweep: its recipe, version, gate decisions and figures (from MLflow), job order."""
    import mlflow

    client = mlflow.MlflowClient()
    parent = client.get_run(parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=1000
    )
    name = cfg.mlflow.registered_model
    by_run = {mv.run_id: mv for mv in registry.client().search_model_versions(f"name = '{name}'")}
    trials = []
    for run in children:
        mv = by_run.get(run.info.run_id)
        job = _job_number(run.data.tags)
        trial = {
            "trial": job,
            "run_id": run.info.run_id,
            "version": str(mv.version) if mv else None,
            "recipe": {k: _param(run.data.params, k) for k in RECIPE_KEYS},
            "decision": run.data.tags.get("gate.decision", "not gated"),
            "gate1": run.data.tags.get("gate.regression.decision", ""),
            "gate2": run.data.tags.get("gate.new_samples.decision", ""),
            "drop": run.data.metrics.get("gate.regression.drop"),
            "anchor_map50": run.data.metrics.get("gate.regression.candidate_map50"),
            "detection_rate": run.data.metrics.get(recipes.RATE),
            "trained_on_rate": run.data.metrics.get("gate.new_samples.trained_on_detection_rate"),
            "status": run.info.status,
        }
        trial["objective"] = _objective(trial)
        trials.append(trial)
    trials.sort(key=lambda t: (t["trial"] is None, t["trial"] if t["trial"] is not None else 0, t["run_id"]))
    return trials


def _job_number(tags: dict) -> int | None:
    """The job's number in the sweep (Hydra's job folder name), from the run's source tag if present."""
    value = tags.get(SWEEP_JOB_TAG)
    return int(value) if value is not None and str(value).isdigit() else None


def _param(params: dict, key: str):
    for name in (key, key.removeprefix("finetune."), key.replace("finetune.", "finetune/")):
        if name in params:
            value = params[name]
            try:
                number = float(value)
                return int(number) if number.is_integer() and "." not in value else number
            except ValueError:
                return value
    return None


def _objective(trial: dict) -> float | None:
    if trial["detection_rate"] is None:
        return None
    record = {
        "figures": {recipes.RATE: trial["detection_rate"]},
        "gates": {"regression": {"decision": trial["gate1"]}, "new_samples": {"decision": trial["gate2"]}},
    }
    return recipes.objective(record)


def best(trials: list[dict]) -> dict | None:
    """The best trial that passes every gate: highest Gate 2 rate, then smallest Gate 1 drop, then earliest."""
    passing = [t for t in trials if t["decision"] == "pass" and t["version"]]
    if not passing:
        return None
    return min(passing, key=lambda t: (-t["detection_rate"], t["drop"], int(t["version"])))


def report_markdown(cfg: DictConfig, guide: dict, trials: list[dict], chosen: dict | None, command: str) -> str:
    """The comparison of the guide's candidate and every trial, best first, and what happened."""
    g2 = float(cfg.gate.new_samples.pass_above)
    g1 = float(cfg.gate.regression.pass_below)
    lines = [
        "# Recipe search",
        "",
        f"The guide's recipe (v{guide['version']}) did not pass Gate 2: it found "
        f"{_pct(guide['detection_rate'])} of the held-out reported objects (pass > {g2:.0%}). "
        f"{len(trials)} trial(s) fine-tuned from the base with replay, each gated against production "
        f"(Gate 1 passes below a {g1} point drop).",
        "",
    ]
    if chosen:
        lines.append(
            f"**Best passing trial: v{chosen['version']}** ({_recipe_text(chosen['recipe'])}): Gate 2 "
            f"{_pct(chosen['detection_rate'])}, Gate 1 drop {chosen['drop']:.2f} points. It takes `staging`; "
            f"promote it after review: `detloop promote {chosen['version']} --reviewer NAME --reason TEXT`."
        )
    else:
        lines.append(
            "**No trial passed every gate.** `staging` stays with the guide's candidate. Next: check the labels "
            "the gate report flags, raise `search.trials`, or widen `search.space`."
        )
    lines += [
        "",
        "| trial | version | recipe | Gate 1 drop | Gate 2 rate | decision | objective |",
        "|---|---|---|---|---|---|---|",
    ]
    lines.append(
        f"| guide | v{guide['version']} | {_recipe_text(guide['recipe'])} | {_num(guide['drop'])} | "
        f"{_pct(guide['detection_rate'])} | {guide['decision']} | {_num(guide.get('objective'), 3)} |"
    )
    ranked = sorted(trials, key=lambda t: -(t["objective"] if t["objective"] is not None else -9))
    for t in ranked[: int(cfg.search.report_top)]:
        mark = " **(staging)**" if chosen and t["run_id"] == chosen["run_id"] else ""
        number = t["trial"] if t["trial"] is not None else "-"
        lines.append(
            f"| {number} | v{t['version']}{mark} | {_recipe_text(t['recipe'])} | "
            f"{_num(t['drop'])} | {_pct(t['detection_rate'])} | {t['decision']} | {_num(t['objective'], 3)} |"
        )
    lines += ["", "Run the same search by hand (the stage ran exactly this):", "", f"```bash\n{command}\n```", ""]
    return "\n".join(lines)


def trials_plot(cfg: DictConfig, guide: dict, trials: list[dict], chosen: dict | None, path: Path) -> None:
    """Gate 1 drop (x) against Gate 2 rate (y) for the guide's candidate and each trial, with the gate lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.axhline(float(cfg.gate.new_samples.pass_above), color="#2e7d32", ls="--", lw=1, label="Gate 2 pass line")
    ax.axvline(float(cfg.gate.regression.pass_below), color="#c62828", ls="--", lw=1, label="Gate 1 pass line")
    shown = [t for t in trials if t["drop"] is not None and t["detection_rate"] is not None]
    ax.scatter(
        [t["drop"] for t in shown], [t["detection_rate"] for t in shown], color="#2f6fdb", label="trials", zorder=3
    )
    for t in shown:
        ax.annotate(
            f"v{t['version']}", (t["drop"], t["detection_rate"]), textcoords="offset points", xytext=(4, 4), fontsize=8
        )
    if guide.get("drop") is not None:
        ax.scatter(
            [guide["drop"]], [guide["detection_rate"]], color="#9aa5b1", marker="s", label="guide's recipe", zorder=3
        )
    if chosen:
        ax.scatter(
            [chosen["drop"]],
            [chosen["detection_rate"]],
            s=160,
            facecolors="none",
            edgecolors="#f9a825",
            lw=2,
            label="staging",
            zorder=4,
        )
    ax.set_xlabel("Gate 1: anchor-test mAP50 drop (points; left is better)")
    ax.set_ylabel("Gate 2: pool-holdout detection rate")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Recipe search: every trial gated")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_report(
    parent_run_id: str, best_run_id: str | None, files: dict[str, str | bytes], metrics: dict, tags: dict
) -> None:
    """The report in the parent run (and the staged trial's run): artifacts under ``search/``, figures, tags."""
    import time

    import mlflow
    from mlflow.entities import Metric, RunTag

    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "search"
        folder.mkdir()
        for name, data in files.items():
            (folder / name).write_bytes(data if isinstance(data, bytes) else data.encode())
        for run_id in filter(None, {parent_run_id, best_run_id}):
            client.log_artifacts(run_id, str(folder), artifact_path="search")
    client.log_batch(
        parent_run_id,
        metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None],
        tags=[RunTag(k, str(v)) for k, v in tags.items()],
    )


def guide_row(record: dict, cfg: DictConfig) -> dict:
    """The guide's candidate (the gate record of the `finetune` stage) in the trials' shape."""
    figures, gates = record.get("figures", {}), record.get("gates", {})
    return {
        "version": record["candidate"]["version"],
        "run_id": record["candidate"].get("run_id"),
        "recipe": {k: _cfg_value(cfg, k) for k in RECIPE_KEYS},
        "decision": record.get("decision"),
        "drop": figures.get("gate.regression.drop"),
        "detection_rate": figures.get(recipes.RATE),
        "gate1": gates.get("regression", {}).get("decision"),
        "gate2": gates.get("new_samples", {}).get("decision"),
        "objective": recipes.objective(record),
    }


def _cfg_value(cfg: DictConfig, key: str):
    node = cfg
    for part in key.split("."):
        node = node.get(part) if node is not None else None
    return node


def _recipe_text(recipe: dict) -> str:
    short = {"finetune.train.": "", "finetune.replay.": "replay."}
    parts = []
    for key, value in recipe.items():
        if value is None:
            continue
        name = key
        for prefix, repl in short.items():
            name = name.replace(prefix, repl)
        parts.append(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}")
    return ", ".join(parts)


def _pct(value) -> str:
    return "-" if value is None else f"{float(value):.1%}"


def _num(value, digits: int = 2) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


def search_and_stage(cfg: DictConfig, record: dict, folder: Path, overrides: list[str]) -> dict:
    """Run the trials, pick the best passing one, give it ``staging`` (recorded), write and log the report."""
    runs.setup(cfg)  # the project's tracking store; an unreachable server fails here, before any trial
    guide = guide_row(record, cfg)
    parent = run_trials(cfg, folder, overrides)
    trials = collect(cfg, parent["run_id"], folder)
    chosen = best(trials)
    command = recipes.sweep_command(cfg)
    staged = stage(cfg, chosen, len(trials)) if chosen is not None else None
    report = report_markdown(cfg, guide, trials, chosen, command)
    out = folder.parent
    (out / "report.md").write_text(report)
    trials_plot(cfg, guide, trials, chosen, out / "trials.png")
    (out / "trials.json").write_text(json.dumps({"guide": guide, "trials": trials}, indent=2, default=str))
    passing = sum(t["decision"] == "pass" for t in trials)
    log_report(
        parent["run_id"],
        chosen["run_id"] if chosen else None,
        {
            "report.md": report,
            "trials.png": (out / "trials.png").read_bytes(),
            "trials.json": (out / "trials.json").read_text(),
        },
        {
            "search.trials": len(trials),
            "search.passing": passing,
            "search.best_detection_rate": chosen["detection_rate"] if chosen else None,
            "search.best_drop": chosen["drop"] if chosen else None,
            "search.guide_detection_rate": guide["detection_rate"],
        },
        {
            "search.best_version": chosen["version"] if chosen else "none",
            "search.guide_version": guide["version"],
            "mlflow.note.content": report,  # the parent run's description in the MLflow UI
        },
    )
    log.info("%s", report)
    return {
        "parent_run_id": parent["run_id"],
        "trials_run": len(trials),
        "passing": passing,
        "trials": trials,
        "staged": staged,
    }


def stage(cfg: DictConfig, chosen: dict, n_trials: int) -> dict:
    """Give the chosen trial ``staging`` (one recorded move; never ``production``: a human promotes it)."""
    name = cfg.mlflow.registered_model
    registry.reconcile(cfg, "staging")
    holder = registry.alias_holder(name, "staging")
    version = str(chosen["version"])
    why = (
        f"recipe search: best of {n_trials} trial(s), passes every gate (Gate 2 {chosen['detection_rate']:.1%}, "
        f"Gate 1 drop {chosen['drop']:.2f}); {_recipe_text(chosen['recipe'])}"
    )
    if holder != version:
        registry.move_alias(
            cfg,
            "staging",
            version,
            why=why,
            decision="pass",
            figures={recipes.RATE: chosen["detection_rate"], "gate.regression.drop": chosen["drop"]},
            tags={"audit.kind": "finetune", "audit.stage": "search"},
            expected=holder,
        )
    registry.set_version_tags(name, version, {"search.staged": "true"})
    log.info("v%s takes staging: %s", version, why)
    return {
        "version": version,
        "from": holder,
        **{k: chosen[k] for k in ("run_id", "detection_rate", "drop", "recipe")},
    }
