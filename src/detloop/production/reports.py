"""Failure reports into the inbox: the prediction as proposed YOLO labels, ``add_to_inbox``, and
``detloop report IMAGE``."""

from __future__ import annotations

import tempfile
from pathlib import Path

from omegaconf import DictConfig

from detloop.core.errors import BadInput
from detloop.production.batching import predictions_by_row
from detloop.production.request_checks import RequestRefused
from detloop.production.swap import ModelWatcher, ServedModel, now_iso


def yolo_lines(detections: list[dict]) -> list[str]:
    """Detections as YOLO label lines (``class xc yc w h``, normalized), degenerate boxes dropped."""
    lines = []
    for d in detections:
        xc, yc, w, h = (min(max(float(d[k]), 0.0), 1.0) for k in ("xc", "yc", "w", "h"))
        if w > 0 and h > 0:
            lines.append(f"{int(d['class_id'])} {xc:.6f} {yc:.6f} {w:.6f} {h:.6f}")
    return lines


def add_report(cfg: DictConfig, image: Path, detections: list[dict], note: str | None) -> dict:
    """``image`` with the detections as proposed labels into the inbox (``add_to_inbox``).

    Returns ``{id, path, labels, inbox_size}``; a refusal (duplicate report, test leakage, bad image)
    raises RequestRefused: 409 for a duplicate, 422 otherwise, with the inbox's reason. A prediction
    without detections proposes no labels (the reviewer must label the sample to accept it).
    """
    from detloop.data.inbox import add_to_inbox

    lines = yolo_lines(detections)
    with tempfile.TemporaryDirectory(prefix="detloop-report-") as tmp:
        if lines:
            (Path(tmp) / f"{image.stem}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        result = add_to_inbox(image, cfg, labels=Path(tmp), note=note)
    if result["refused"]:
        reason = "; ".join(item["reason"] for item in result["refused"])
        status = 409 if "duplicate" in reason else 422
        raise RequestRefused(status, f"report refused: {reason}")
    return {
        "id": result["accepted"][0],
        "path": str(image),
        "labels": len(lines),
        "inbox_size": result["counts"]["inbox_size"],
    }


def report_image(cfg: DictConfig, image: Path, note: str | None = None) -> dict:
    """``detloop report IMAGE``: predict with the ``serve.alias`` holder, add image + proposal to the inbox.

    Raises BadInput (exit 2, nothing written) for a missing or unreadable image, when no version holds
    the alias, and when the inbox refuses the report (the reason is in the message).
    """
    from detloop.data.yolo_format import check_image
    from detloop.tracking import oversight, runs

    image = Path(image).expanduser().absolute()
    if not image.is_file():
        raise BadInput(f"{image}: no such image file; nothing was written")
    problems = check_image(image, int(cfg.inbox.max_pixels))
    if problems:
        raise BadInput(f"{image}: not a usable image; nothing was written", problems)
    runs.setup(cfg)
    alias = str(cfg.serve.alias)
    watcher = ModelWatcher(
        cfg.mlflow.registered_model,
        alias,
        0,
        loader=_load_cold,
        oversee=lambda: oversight.watch(cfg, (alias,), seen_by="report"),
    )
    served = watcher.load()
    import pandas as pd

    table = served.model.predict(pd.DataFrame({"image": [str(image)]}))
    detections = predictions_by_row(table, 1)[0]
    try:
        added = add_report(cfg, image, detections, note)
    except RequestRefused as err:
        raise BadInput(f"{image}: {err.summary}; nothing was written") from err
    return {**added, "model_version": served.version, "detections": len(detections)}


def _load_cold(name: str, version: str) -> ServedModel:
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    return ServedModel(name, str(version), model, now_iso())
