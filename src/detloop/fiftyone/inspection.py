"""``detloop inspect``: detloop's sets with model predictions in FiftyOne, evaluated, optionally in the App.

:func:`resolve_models` turns registry versions and aliases (MLflow) or local ``.pt`` files into
``{weights, version, imgsz, label}``; :func:`inspect_sets` loads the sets, adds each model's
predictions, evaluates them and prints the figures and classification report; :func:`launch_app`
serves the App. Call :func:`detloop.fiftyone.db.connect` before the FiftyOne functions.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from omegaconf import DictConfig

from detloop.core.config import resolve_path
from detloop.core.errors import BadInput
from detloop.data.datasets import anchor_names
from detloop.fiftyone import eval as fo_eval
from detloop.fiftyone import load as fo_load

log = logging.getLogger(__name__)


def resolve_models(cfg: DictConfig, specs: list[str]) -> list[dict]:
    """Registry versions / aliases (or local ``.pt`` files) -> ``{weights, version, imgsz, label}``.

    Registered weights are downloaded once per version to ``build/fiftyone/models/v<N>`` (versions
    are immutable). Raises BadInput naming a spec that is neither a file, a version nor an alias.
    """
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
    from detloop.tracking import oversight, registry, runs

    runs.setup(cfg)
    oversight.watch(cfg)  # an alias moved in the MLflow UI is recorded (or put back) before it is resolved
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


def inspect_sets(cfg: DictConfig, sets: list[str], models: list[dict], *, evaluate: bool = True) -> tuple[dict, dict]:
    """Load ``sets`` with each model's predictions and evaluate them (not on the inbox, which has no
    verified labels). Prints each evaluation's mAP and classification report.

    Returns ``(result, datasets)``: ``result`` is JSON-ready, ``{datasets: {name: {samples, fields,
    figures: {field: {map50, map50_95, per_class_ap50, eval_key, report}}}}}``; ``datasets`` maps the
    set names to their FiftyOne datasets.
    """
    names = anchor_names(resolve_path(cfg, "anchor"))
    result: dict = {"datasets": {}}
    datasets = {}
    for set_name in fo_load.check_sets(sets):
        dataset = fo_load.load_set(cfg, set_name, names)
        datasets[set_name] = dataset
        entry = result["datasets"][dataset.name] = {"samples": len(dataset), "fields": [], "figures": {}}
        store_conf = cfg.fiftyone.inspect.store_conf
        for model in models:
            kept: dict = {}
            field = fo_load.add_predictions(
                cfg, dataset, model, min_conf=None if store_conf is None else float(store_conf), keep=kept
            )
            entry["fields"].append(field)
            if evaluate and set_name != "inbox" and len(dataset):
                entry["figures"][field] = _evaluate(cfg, dataset, field, model, kept)
    return result, datasets


def _evaluate(cfg: DictConfig, dataset, field: str, model: dict, kept: dict) -> dict:
    """mAP and the classification report of ``field``, and the per-sample TP/FP/FN under its eval key.

    With ``fiftyone.inspect.store_conf`` set, only predictions at or above it are in the dataset: FiftyOne
    matches those (TP/FP/FN, patches, the report at the serving confidence) without computing mAP, and mAP
    comes from the gate's evaluator on the whole prediction pass (``kept``), so it is the gate's figure.
    Without it FiftyOne computes mAP and PR curves from every stored prediction (slow).
    """
    store_conf = cfg.fiftyone.inspect.store_conf
    top_n = int(cfg.fiftyone.evaluate.top_n)
    if store_conf is None:
        results = fo_eval.evaluate(dataset, field, cfg)
        figures = fo_eval.figures(results)
        threshold = cfg.fiftyone.evaluate.report_conf
        conf = None if threshold is None else float(threshold)
        report = fo_eval.report(results, dataset, top_n, conf=conf)
    else:
        conf = float(store_conf)
        results = fo_eval.evaluate(dataset, field, cfg, compute_mAP=False, iou=float(cfg.gate.new_samples.iou))
        figures = gate_figures(cfg, kept)
        report = fo_eval.report(results, dataset, top_n)  # every stored prediction is at or above conf
    if conf is not None:
        print(f"classification report at confidence >= {conf:g}:")
    print(
        f"{dataset.name} {field} ({model.get('label')}): mAP50 {figures['map50']:.4f}, "
        f"mAP50-95 {figures['map50_95']:.4f}"
    )
    print(fo_eval.format_report(report))
    return {**figures, "eval_key": fo_eval.eval_key(field), "report": report}


def gate_figures(cfg: DictConfig, kept: dict) -> dict:
    """mAP50, mAP50-95 and per-class AP50 of a whole prediction pass, by the gate's evaluator and labels."""
    from detloop.evaluation import evaluator
    from detloop.evaluation.measure import score

    names = anchor_names(resolve_path(cfg, "anchor"))  # the classes of every set's labels, as the gate reads them
    gts = evaluator.load_ground_truth(kept["paths"], num_classes=max(names) + 1)
    found = score(cfg, gts, [evaluator.Detections(b, c, s) for b, c, s in kept["detections"]], names)
    return {
        "map50": found["map50"],
        "map50_95": found["map50_95"],
        "per_class_ap50": found["ap50"],
        "map_source": "detloop evaluator (the gate's), every prediction of the pass",
    }


def launch_app(cfg: DictConfig, dataset) -> None:
    """Serve the App on ``fiftyone.app.address:port`` (on ``dataset``, or a saved view of one), print the
    URL and block until interrupted."""
    import fiftyone as fo

    app = cfg.fiftyone.app
    session = fo.launch_app(dataset, address=str(app.address), port=int(app.port), remote=True, auto=False)
    url = app_url(cfg, dataset) if dataset is not None else session.url
    print(f"FiftyOne App: {url}  (Ctrl-C to stop)", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        session.wait(-1)


def app_url(cfg: DictConfig, samples) -> str:
    """The App's URL of a dataset, or of a saved view of one (``/datasets/<name>?view=<slug>``)."""
    from fiftyone.core.utils import to_slug

    app = cfg.fiftyone.app
    name = getattr(samples, "dataset_name", None) or samples.name
    url = f"http://{app.address}:{int(app.port)}/datasets/{name}"
    return f"{url}?view={to_slug(samples.name)}" if getattr(samples, "is_saved", False) else url
