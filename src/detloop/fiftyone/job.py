"""FiftyOne work in a process of its own: ``python -m detloop.fiftyone.job JOB.json``.

``import fiftyone`` fails once MLflow is imported (see :mod:`detloop.fiftyone.db`), and the
``detloop`` commands need MLflow to turn a registry alias into weights. So the command's process
resolves models (:func:`resolve_models`, MLflow) and hands a job to a child process
(:func:`run_job`) that does the FiftyOne work and never imports MLflow. The job is JSON:
``{action, overrides, sets, models: [{weights, version, imgsz, label}], evaluate, app, reviewer}``;
the child writes its result (or the error) as JSON beside it.

Actions: ``inspect`` (load sets and predictions, evaluate, optionally launch the App),
``review-open`` (the inbox dataset with the review model's predictions as proposed labels),
``review-commit`` (verified -> pool, rejected recorded) and ``annotate`` (send to the backend).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from omegaconf import DictConfig

from detloop.core.errors import BadInput

log = logging.getLogger(__name__)

ACTIONS = ("inspect", "review-open", "review-commit", "annotate")
TAG_PATHS_GROUP = "_label_tags"  # a sidebar group the App does not display (see show_in_app)


# --------------------------------------------------------------------------- the command's side (MLflow)


def resolve_models(cfg: DictConfig, specs: list[str]) -> list[dict]:
    """Registry versions / aliases (or local ``.pt`` files) -> ``{weights, version, imgsz, label}``.

    Registered weights are downloaded once per version to ``build/fiftyone/models/v<N>`` (versions
    are immutable). Raises BadInput naming a spec that is neither a file, a version nor an alias.
    """
    from detloop.core.config import resolve_path

    out, registered = [], []
    for spec in dict.fromkeys(str(s) for s in specs):
        path = Path(spec).expanduser()
        if spec.endswith(".pt"):
            if not path.is_file():
                raise BadInput(f"model {spec!r}: weights file not found")
            out.append({"weights": str(path.absolute()), "version": None, "imgsz": None, "label": path.name})
        else:
            registered.append(spec)
    if registered:
        out += _registered(cfg, registered, resolve_path(cfg, "build") / "fiftyone" / "models")
    return out


def _registered(cfg: DictConfig, specs: list[str], cache: Path) -> list[dict]:
    from detloop.model.pyfunc import model_weights
    from detloop.tracking import registry, runs

    runs.setup(cfg)
    name = cfg.mlflow.registered_model
    out = []
    for spec in specs:
        version = spec.lstrip("v") if spec.lstrip("v").isdigit() else registry.alias_holder(name, spec)
        if version is None:
            raise BadInput(
                f"model {spec!r}: no version of {name} holds alias {spec!r}",
                ["give a version number, an alias (base, staging, production) or a .pt file"],
            )
        folder = cache / f"v{version}"
        found = sorted((folder / "artifacts").glob("*.pt")) if folder.is_dir() else []
        if found and (folder / "imgsz").is_file():
            weights, imgsz = found[0], int((folder / "imgsz").read_text())
        else:
            weights, config = model_weights(f"models:/{name}/{version}", folder)
            imgsz = int(config.get("imgsz", 640))
            (folder / "imgsz").write_text(str(imgsz))
        out.append(
            {
                "weights": str(weights),
                "version": str(version),
                "imgsz": imgsz,
                "label": f"v{version}" + (f" ({spec})" if not spec.lstrip("v").isdigit() else ""),
            }
        )
    return out


def run_job(job: dict, *, wait: bool = True) -> dict | subprocess.Popen:
    """Run ``job`` in a child process (``python -m detloop.fiftyone.job``); return its result.

    The child's output goes to this process's terminal (the App URL is printed there). A BadInput
    in the child is raised here again. ``wait=False`` returns the running process (the App).
    """
    if job.get("action") not in ACTIONS:
        raise BadInput(f"FiftyOne job action {job.get('action')!r}", [f"expected one of {', '.join(ACTIONS)}"])
    folder = Path(tempfile.mkdtemp(prefix="detloop-fiftyone-job-"))
    job_file, result_file = folder / "job.json", folder / "result.json"
    job_file.write_text(json.dumps({**job, "result": str(result_file)}, indent=2))
    command = [sys.executable, "-m", "detloop.fiftyone.job", str(job_file)]
    if not wait:  # a session of its own: stopping its group also stops the App server it starts
        return subprocess.Popen(command, env=os.environ.copy(), start_new_session=True)
    done = subprocess.run(command, env=os.environ.copy(), check=False)
    result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    if done.returncode == BadInput.exit_code and "error" in result:
        raise BadInput(result["error"], result.get("details") or [])
    if done.returncode != 0:
        raise RuntimeError(f"the FiftyOne process failed (exit {done.returncode}): {result.get('error', '')}")
    return result


# --------------------------------------------------------------------------- the child's side (FiftyOne)


def execute(cfg: DictConfig, job: dict) -> dict:
    """Do one job in this process (FiftyOne imported here, MLflow never)."""
    from detloop.fiftyone import db as fo_db

    fo = fo_db.connect(cfg)
    action = job["action"]
    if action == "inspect":
        result = _inspect(cfg, job)
    elif action == "review-open":
        result = _review_open(cfg, job)
    elif action == "review-commit":
        from detloop.fiftyone.review import commit

        result = commit(cfg, job.get("reviewer"))
    else:
        from detloop.fiftyone.review import request_annotation, review_dataset

        result = {"anno_key": request_annotation(cfg, review_dataset(cfg))}
    result["database_uri"] = fo.config.database_uri
    result["mlflow_imported"] = "mlflow" in sys.modules
    return result


def _inspect(cfg: DictConfig, job: dict) -> dict:
    from detloop.core.config import resolve_path
    from detloop.data.datasets import anchor_names
    from detloop.fiftyone import eval as fo_eval
    from detloop.fiftyone import load as fo_load

    names = anchor_names(resolve_path(cfg, "anchor"))
    sets = fo_load.check_sets(job.get("sets") or list(cfg.fiftyone.sets))
    result: dict = {"datasets": {}}
    datasets = {}
    for set_name in sets:
        dataset = fo_load.load_set(cfg, set_name, names)
        datasets[set_name] = dataset
        entry = result["datasets"][dataset.name] = {"samples": len(dataset), "fields": [], "figures": {}}
        for model in job.get("models", []):
            field = fo_load.add_predictions(cfg, dataset, model)
            entry["fields"].append(field)
            if job.get("evaluate", True) and set_name != "inbox" and len(dataset):
                results = fo_eval.evaluate(dataset, field, cfg)
                figures = fo_eval.figures(results)
                threshold = cfg.fiftyone.evaluate.report_conf
                report = fo_eval.report(
                    results,
                    dataset,
                    int(cfg.fiftyone.evaluate.top_n),
                    conf=None if threshold is None else float(threshold),
                )
                if threshold is not None:
                    print(f"classification report at confidence >= {float(threshold):g}:")
                entry["figures"][field] = {**figures, "eval_key": fo_eval.eval_key(field), "report": report}
                print(
                    f"{dataset.name} {field} ({model.get('label')}): mAP50 {figures['map50']:.4f}, "
                    f"mAP50-95 {figures['map50_95']:.4f}"
                )
                print(fo_eval.format_report(report))
    if job.get("app"):
        _launch_app(cfg, datasets[sets[0]] if sets else None)
    return result


def _review_open(cfg: DictConfig, job: dict) -> dict:
    from detloop.core.config import resolve_path
    from detloop.data.datasets import anchor_names
    from detloop.fiftyone import load as fo_load
    from detloop.fiftyone.review import finish_interrupted, sync_with_inbox

    names = anchor_names(resolve_path(cfg, "anchor"))
    finish_interrupted(cfg)
    dataset = fo_load.load_set(cfg, str(cfg.fiftyone.review.dataset), names)
    sync_with_inbox(cfg, dataset)
    fields, filled = [], 0
    for model in job.get("models", []):
        field = fo_load.add_predictions(cfg, dataset, model)
        fields.append(field)
        filled += fo_load.fill_review_labels(cfg, dataset, field)
    show_in_app(cfg, dataset)
    result = {"dataset": dataset.name, "samples": len(dataset), "fields": fields, "proposed_from_predictions": filled}
    print(
        f"{dataset.name}: {len(dataset)} report(s) to review; {filled} with the model's predictions as "
        f"proposed labels. Tag samples '{cfg.fiftyone.review.verified_tag}' or "
        f"'{cfg.fiftyone.review.rejected_tag}', then: detloop review commit --reviewer NAME"
    )
    if job.get("app"):
        _launch_app(cfg, dataset)
    return result


def show_in_app(cfg: DictConfig, dataset) -> None:
    """The review dataset opens with its sample tags, the labels to verify and the predictions shown.

    The App (FiftyOne 1.22) checks by default only the ``active_fields`` paths it finds in the sidebar
    groups, and it always rebuilds its "tags" group empty: ``tags`` in ``active_fields`` alone stays
    unchecked. A group named ``_label_tags`` is left out of the displayed sidebar but its paths count,
    so it carries ``tags`` and ``_label_tags`` and the grid shows the tag pills. The review tags get
    colours of their own (``fiftyone.review.verified_color`` / ``rejected_color``).
    """
    import fiftyone as fo
    from fiftyone.core.odm.dataset import ActiveFields, SidebarGroupDocument

    review = cfg.fiftyone.review
    label_field = str(review.label_field)
    fields = [f for f in dataset.get_field_schema() if f == label_field or f.startswith("predictions_")]
    tag_paths = ["tags", "_label_tags"]
    config = dataset.app_config
    config.active_fields = ActiveFields(paths=[*tag_paths, *fields])
    groups = config.sidebar_groups or fo.DatasetAppConfig.default_sidebar_groups(dataset)
    config.sidebar_groups = [
        *(g for g in groups if g.name != TAG_PATHS_GROUP),
        SidebarGroupDocument(name=TAG_PATHS_GROUP, paths=tag_paths),
    ]
    tag_colors = [
        {"value": str(review.verified_tag), "color": str(review.verified_color)},
        {"value": str(review.rejected_tag), "color": str(review.rejected_color)},
        {"value": "inbox", "color": "#757575"},
    ]  # the tag every inbox sample has: neutral
    config.color_scheme = fo.ColorScheme(color_by="value", fields=[{"path": "tags", "valueColors": tag_colors}])
    dataset.save()


def _launch_app(cfg: DictConfig, dataset) -> None:
    """Serve the App on ``fiftyone.app.address:port``, print the URL and block until interrupted."""
    import fiftyone as fo

    app = cfg.fiftyone.app
    session = fo.launch_app(dataset, address=str(app.address), port=int(app.port), remote=True, auto=False)
    url = f"http://{app.address}:{int(app.port)}/datasets/{dataset.name}" if dataset is not None else session.url
    print(f"FiftyOne App: {url}  (Ctrl-C to stop)", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        session.wait(-1)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    job = json.loads(Path(argv[0]).read_text())
    result_file = Path(job["result"])
    from detloop.fiftyone.db import import_fiftyone

    import_fiftyone()  # first, before anything could import MLflow
    from detloop.core.config import compose

    try:
        result = execute(compose(job.get("overrides", [])), job)
    except BadInput as err:
        result_file.write_text(json.dumps({"error": err.summary, "details": err.problems}))
        print(f"error: {err.render()}", file=sys.stderr)
        return BadInput.exit_code
    result_file.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
