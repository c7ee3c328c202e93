"""FiftyOne-side steps of the FiftyOne tests: each takes its arguments as a dict (``overrides`` and
the step's own) and returns the facts the test checks. ``STEPS`` names them; call
:func:`detloop.fiftyone.db.connect` first. :func:`synthetic_predictions` needs no FiftyOne.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def synthetic_predictions(images: list[Path], seed: int = 0) -> list:
    """Plausible detections from the ground truth: jittered boxes (some of another class), misses and
    false positives, random confidences. Deterministic for ``seed``; mAP well above 0 and below 1."""
    from detloop.evaluation.evaluator import Detections, image_size, load_ground_truth

    rng = np.random.default_rng(seed)
    out = []
    for image, gt in zip(images, load_ground_truth(images), strict=True):
        width, height = image_size(image)
        boxes, cls, conf = [], [], []
        for box, c in zip(gt.boxes, gt.cls, strict=True):
            if rng.random() < 0.15:
                continue  # a miss
            size = box[2:] - box[:2]
            shift = rng.normal(0, 0.08, 2) * size
            boxes.append(np.concatenate([box[:2] + shift, box[2:] + shift]))
            cls.append(int(c) if rng.random() > 0.1 else int((c + 1) % 6))
            conf.append(float(rng.uniform(0.2, 1.0)))
        for _ in range(int(rng.integers(0, 3))):  # false positives
            x, y = rng.uniform(0, width - 40), rng.uniform(0, height - 20)
            boxes.append(np.array([x, y, x + rng.uniform(10, 40), y + rng.uniform(5, 20)]))
            cls.append(int(rng.integers(0, 6)))
            conf.append(float(rng.uniform(0.0, 0.7)))
        out.append(Detections(np.array(boxes).reshape(-1, 4), np.array(cls), np.array(conf)))
    return out


def _cfg(args: dict):
    from detloop.core.config import compose

    return compose(args["overrides"])


def store_synthetic(args: dict) -> dict:
    """Load anchor-test, store the synthetic predictions as ``predictions_synthetic``, evaluate."""
    from detloop.core.config import resolve_path
    from detloop.data.datasets import anchor_names
    from detloop.fiftyone import eval as fo_eval
    from detloop.fiftyone import load as fo_load

    cfg = _cfg(args)
    names = anchor_names(resolve_path(cfg, "anchor"))
    dataset = fo_load.load_set(cfg, "anchor-test", names)
    paths = [Path(p) for p in dataset.values("filepath")]
    sizes = zip(dataset.values("metadata.width"), dataset.values("metadata.height"), strict=True)
    values = {
        str(p): fo_load.detections_from_pixels(d.boxes, d.cls, d.conf, size, names)
        for p, d, size in zip(paths, synthetic_predictions(paths, args["seed"]), sizes, strict=True)
    }
    dataset.set_values("predictions_synthetic", values, key_field="filepath")
    results = fo_eval.evaluate(dataset, "predictions_synthetic", cfg)
    worst = fo_eval.worst_samples(dataset, "eval_synthetic", "fn")
    patches = fo_eval.class_patches(dataset, "eval_synthetic", "table", "predictions_synthetic")
    # the report at a confidence threshold, against FiftyOne evaluating only the confident predictions
    from fiftyone import ViewField as F  # noqa: N817

    at_conf = fo_eval.report(results, dataset, 3, conf=0.5)
    confident = dataset.filter_labels("predictions_synthetic", F("confidence") >= 0.5, only_matches=False)
    direct = fo_eval.evaluate(confident, "predictions_synthetic", cfg, key="eval_confident")
    return {
        "figures": fo_eval.figures(results),
        "paths": [str(p) for p in paths],
        "report": fo_eval.report(results, dataset, 3),
        "report_at_conf": at_conf,
        "report_confident_only": direct.report(classes=[k for k in at_conf if "avg" not in k]),
        "fn_sorted": worst.values("eval_synthetic_fn"),
        "patch_labels": sorted(set(patches.distinct("type"))),
        "patches": len(patches),
        "table_objects": dataset.count_values("ground_truth.detections.label")["table"],
    }


def compare_fields(args: dict) -> dict:
    from detloop.fiftyone import eval as fo_eval

    cfg = _cfg(args)
    import fiftyone as fo

    dataset = fo.load_dataset(args["dataset"])
    found = fo_eval.compare(dataset, args["base"], args["candidate"], cfg)
    return {
        "base": found["base"],
        "candidate": found["candidate"],
        "map50_change": found["map50_change"],
        "worse": len(found["candidate_worse"]),
        "better": len(found["candidate_better"]),
        "evaluations": dataset.list_evaluations(),
    }


def dataset_facts(args: dict) -> dict:
    """Samples, fields, tags and per-field label counts of a dataset (masks checked against boxes)."""
    import fiftyone as fo

    _cfg(args)
    dataset = fo.load_dataset(args["dataset"])
    fields = [f for f in dataset.get_field_schema() if f.startswith(("predictions_", "ground_truth", "reported"))]
    masks = {"with_mask": 0, "shape_matches_box": 0, "detections": 0}
    for field in (f for f in fields if f.startswith("predictions_")):
        for sample in dataset.select_fields([field, "metadata"]):
            for det in sample[field].detections if sample[field] else []:
                masks["detections"] += 1
                if det.mask is None:
                    continue
                masks["with_mask"] += 1
                x, y, w, h = det.bounding_box
                W, H = sample.metadata.width, sample.metadata.height  # noqa: N806
                cols = int(np.ceil(min((x + w) * W, W))) - int(np.floor(max(x * W, 0)))
                rows = int(np.ceil(min((y + h) * H, H))) - int(np.floor(max(y * H, 0)))
                masks["shape_matches_box"] += det.mask.shape == (max(rows, 1), max(cols, 1))
    return {
        "samples": len(dataset),
        "fields": sorted(fields),
        "persistent": dataset.persistent,
        "ids": sorted(dataset.values("detloop_id")),
        "tags": dataset.count_sample_tags(),
        "masks": masks,
        "labels": {f: dataset.count(f"{f}.detections") for f in fields},
        "filled": {
            d: bool(g is not None)
            for d, g in zip(dataset.values("detloop_id"), dataset.values("ground_truth"), strict=True)
        },
        "min_confidence": {
            f: dataset.bounds(f"{f}.detections.confidence")[0] for f in fields if f.startswith("predictions_")
        },
        "eval_sums": {
            f: dataset.sum(f)
            for f in dataset.get_field_schema()
            if f.startswith("eval_") and f.endswith(("_tp", "_fp", "_fn"))
        },
    }


def tag_for_review(args: dict) -> dict:
    """What a reviewer does in the App: sample tags, a wrong box tagged, a label edited, a reason."""
    import fiftyone as fo

    cfg = _cfg(args)
    r = cfg.fiftyone.review
    before = dataset_facts(args)
    dataset = fo.load_dataset(args["dataset"])
    by_id = {s.detloop_id: s for s in dataset}
    for sample_id in args.get("verify", []):
        by_id[sample_id].tags.append(str(r.verified_tag))
        by_id[sample_id].save()
    for sample_id in args.get("reject", []):
        sample = by_id[sample_id]
        sample.tags.append(str(r.rejected_tag))
        if args.get("reason"):
            sample[str(r.reason_field)] = args["reason"]
        sample.save()
    edited = {}
    if args.get("drop_first_box_of"):
        sample = by_id[args["drop_first_box_of"]]
        sample.ground_truth.detections[0].tags.append(str(r.drop_label_tag))
        sample.save()
    if args.get("edit"):
        sample = by_id[args["edit"]]
        sample.ground_truth = fo.Detections(detections=[fo.Detection(label="stamp", bounding_box=[0.1, 0.2, 0.3, 0.4])])
        sample.save()
        edited = {"id": args["edit"], "line": "4 0.250000 0.400000 0.300000 0.400000"}
    return {"before": before, "tags": dataset.count_sample_tags(), "edited": edited}


def write_zoo_info(args: dict) -> dict:
    """FiftyOne's ``info.json`` of a downloaded coco-2017 validation split of ``args['n']`` images."""
    import fiftyone as fo
    import fiftyone.zoo.datasets as zoo

    n = int(args["n"])
    split = {"validation": zoo.ZooDatasetSplitInfo("validation", n)}
    info = zoo.ZooDatasetInfo(
        zoo.get_zoo_dataset("coco-2017"), fo.types.COCODetectionDataset, n, downloaded_splits=split, classes=["Table"]
    )
    path = Path(args["dir"]) / "info.json"
    info.write_json(str(path))
    return {"info": str(path)}


def curate_flow(args: dict) -> dict:
    """The tutorial's curation on project data: class test set, zoo + COCO sources merged with a
    label map, seeded split (twice, same result), Ultralytics export."""
    import fiftyone as fo

    from detloop.core.config import resolve_path
    from detloop.data.datasets import anchor_names
    from detloop.fiftyone import curate as fiftyone_curate
    from detloop.fiftyone import load as fo_load

    cfg = _cfg(args)
    prefix = cfg.fiftyone.dataset_prefix
    names = anchor_names(resolve_path(cfg, "anchor"))
    anchor = fo_load.load_set(cfg, "anchor-test", names)
    pred = args["pred_field"]
    test = fiftyone_curate.class_test_set(anchor, ["table"], f"{prefix}-table-test", pred_fields=[pred])
    zoo = fiftyone_curate.load_source(
        {"kind": "zoo", "name": "coco-2017", "split": "validation", "classes": ["Table"], "zoo_dir": args["zoo_dir"]},
        name=f"{prefix}-zoo",
    )
    coco = fiftyone_curate.load_source({"kind": "coco", "dir": args["coco_dir"]}, name=f"{prefix}-coco")
    merged = fiftyone_curate.merge_sources(
        f"{prefix}-train", [fo.load_dataset(anchor.name), zoo, coco], label_map={"Table": "table"}, classes=["table"]
    )
    first = fiftyone_curate.seeded_split(merged, {"train": 0.75, "val": 0.25}, seed=7)
    train_first = sorted(merged.match_tags("train").values("filepath"))
    again = fiftyone_curate.seeded_split(merged, {"train": 0.75, "val": 0.25}, seed=7)
    train_again = sorted(merged.match_tags("train").values("filepath"))
    yaml_path = fiftyone_curate.export_ultralytics(merged, args["export_dir"], ["table"], splits=["train", "val"])
    return {
        "test_samples": len(test),
        "test_labels": test.distinct("ground_truth.detections.label"),
        "test_pred_labels": test.distinct(f"{pred}.detections.label"),
        "test_without_predictions": len(test.match(fo.ViewField(f"{pred}.detections").length() == 0)),
        "anchor_with_table": len(anchor.filter_labels("ground_truth", fo.ViewField("label") == "table")),
        "zoo_labels": zoo.count_values("ground_truth.detections.label"),
        "merged": len(merged),
        "merged_labels": merged.count_values("ground_truth.detections.label"),
        "split": first,
        "split_again": again,
        "same_split": train_first == train_again,
        "yaml": str(yaml_path),
    }


STEPS = {
    f.__name__: f for f in (store_synthetic, compare_fields, dataset_facts, tag_for_review, write_zoo_info, curate_flow)
}
