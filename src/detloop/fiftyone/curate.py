"""Curate data for fine-tuning in FiftyOne: the YOLOv8 tutorial's recipes as functions.

* :func:`class_test_set`: only the chosen classes, keeping images whose ground truth has them even
  when the model predicted none of them (``only_matches=False`` on the predictions);
* :func:`load_source`: COCO-2017 / Open Images V6 from the FiftyOne zoo (``fiftyone.curate.zoo``;
  read from ``zoo_dir``, downloaded only with ``download: true``), or a local COCO / YOLO folder;
* :func:`merge_sources`: several sources into one dataset, with a label map (Open Images ``Bird``
  -> ``bird``) and only the chosen classes;
* :func:`seeded_split`: a seeded random train/val split as sample tags;
* :func:`export_ultralytics`: Ultralytics-format folders (``images/<split>``, ``labels/<split>``,
  ``dataset.yaml``) ready for ``YOLO.train``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from detloop.core.errors import BadInput
from detloop.fiftyone.load import GT_FIELD

log = logging.getLogger(__name__)

ZOO_NAMES = ("coco-2017", "open-images-v6")
SOURCE_KINDS = ("zoo", "coco", "yolo")


def _persistent_clone(view, name: str):
    """``view`` cloned into a persistent dataset ``name`` (an existing one of that name is replaced)."""
    import fiftyone as fo

    if fo.dataset_exists(name):
        fo.delete_dataset(name)
    dataset = view.clone(name)
    dataset.persistent = True
    dataset.save()
    return dataset


def class_test_set(
    samples, classes: Sequence[str], name: str, *, gt_field: str = GT_FIELD, pred_fields: Sequence[str] = ()
):
    """A persistent test set of the samples with ground-truth objects of ``classes``, only those
    labels kept; predictions filtered to the classes with ``only_matches=False`` so images the
    model missed completely stay in."""
    from fiftyone import ViewField as F  # noqa: N817

    if not classes:
        raise BadInput("class_test_set: no classes given", ["fiftyone.curate.classes: e.g. [table]"])
    view = samples.filter_labels(gt_field, F("label").is_in(list(classes)))
    for field in pred_fields:
        view = view.filter_labels(field, F("label").is_in(list(classes)), only_matches=False)
    dataset = _persistent_clone(view, name)
    dataset.default_classes = list(classes)
    dataset.save()
    log.info("test set %s: %d samples with %s", name, len(dataset), ", ".join(classes))
    return dataset


def load_source(spec: Mapping, name: str | None = None):
    """A source dataset from ``spec``: ``{kind: zoo, name, split, classes, max_samples, zoo_dir, download}``
    (FiftyOne zoo; Open Images gets ``only_matching`` detections of the classes), ``{kind: coco,
    dir}`` (``data/`` + ``labels.json``) or ``{kind: yolo, dir}`` (YOLOv5/Ultralytics layout)."""
    import fiftyone as fo

    spec = dict(spec)
    kind = spec.get("kind", "zoo")
    if kind not in SOURCE_KINDS:
        raise BadInput(f"source kind {kind!r}", [f"expected one of {', '.join(SOURCE_KINDS)}"])
    if kind == "zoo":
        return _load_zoo(spec, name)
    folder = Path(str(spec.get("dir", ""))).expanduser()
    if not folder.is_dir():
        raise BadInput(f"{kind} source folder {folder} does not exist")
    if kind == "coco":
        return fo.Dataset.from_dir(
            dataset_dir=str(folder),
            dataset_type=fo.types.COCODetectionDataset,
            label_field=GT_FIELD,
            label_types="detections",
            name=name,
        )
    return fo.Dataset.from_dir(
        dataset_dir=str(folder),
        dataset_type=fo.types.YOLOv5Dataset,
        label_field=GT_FIELD,
        split=spec.get("split", "val"),
        name=name,
    )


def _load_zoo(spec: dict, name: str | None):
    """A FiftyOne zoo split. With ``download: false`` (the default) the split must already be in
    ``zoo_dir`` (FiftyOne's layout: ``<zoo_dir>/<name>/info.json`` and ``<split>/``); nothing is fetched."""
    import fiftyone as fo
    import fiftyone.zoo as foz

    zoo_name = spec.get("name")
    if zoo_name not in ZOO_NAMES:
        raise BadInput(f"fiftyone.curate.zoo.name={zoo_name!r}", [f"expected one of {', '.join(ZOO_NAMES)}"])
    if spec.get("zoo_dir"):
        fo.config.dataset_zoo_dir = str(Path(str(spec["zoo_dir"])).expanduser())
    info = Path(fo.config.dataset_zoo_dir) / zoo_name / "info.json"
    download = bool(spec.get("download", False))
    if not download and not info.is_file():
        raise BadInput(
            f"zoo dataset {zoo_name} is not in {fo.config.dataset_zoo_dir}",
            [f"{info}: missing; set fiftyone.curate.zoo.download=true to fetch it"],
        )
    kwargs = {
        "split": spec.get("split", "validation"),
        "label_types": ["detections"],
        "dataset_name": name,
        "download_if_necessary": download,
    }
    for key in ("classes", "max_samples", "seed", "shuffle"):
        if spec.get(key) is not None:
            kwargs[key] = spec[key]
    if zoo_name == "open-images-v6" and spec.get("classes"):
        kwargs["only_matching"] = True
    dataset = foz.load_zoo_dataset(zoo_name, **kwargs)
    if dataset.has_field("detections") and not dataset.has_field(GT_FIELD):
        dataset.rename_sample_field("detections", GT_FIELD)  # Open Images names its boxes "detections"
    return dataset


def merge_sources(
    name: str,
    sources: Sequence,
    *,
    label_map: Mapping[str, str] | None = None,
    classes: Sequence[str] | None = None,
    gt_field: str = GT_FIELD,
):
    """One persistent dataset ``name`` from several collections: each source's labels renamed by
    ``label_map`` and, with ``classes``, only those labels (and samples having some) kept."""
    import fiftyone as fo
    from fiftyone import ViewField as F  # noqa: N817

    if not sources:
        raise BadInput("merge_sources: no sources given")
    if fo.dataset_exists(name):
        fo.delete_dataset(name)
    dataset = fo.Dataset(name, persistent=True)
    mapping = {str(k): str(v) for k, v in (label_map or {}).items()}
    for source in sources:
        view = source.map_labels(gt_field, mapping) if mapping else source.view()
        if classes:
            view = view.filter_labels(gt_field, F("label").is_in(list(classes)))
        dataset.merge_samples(view.select_fields(gt_field), key_field="filepath")
    if classes:
        dataset.default_classes = list(classes)
        dataset.save()
    log.info("merged %d source(s) into %s: %d samples", len(sources), name, len(dataset))
    return dataset


def seeded_split(dataset, fractions: Mapping[str, float], seed: int) -> dict[str, int]:
    """Tag the samples with a seeded random split (e.g. train 0.8 / val 0.2); earlier split tags of
    these names are removed first, other tags kept. Returns the count per split."""
    import fiftyone.utils.random as four

    fractions = {str(k): float(v) for k, v in fractions.items()}
    if not fractions or any(v < 0 for v in fractions.values()) or sum(fractions.values()) <= 0:
        raise BadInput(f"split fractions {fractions}", ["fiftyone.curate.split: non-negative, sum > 0"])
    dataset.untag_samples(list(fractions))
    four.random_split(dataset, fractions, seed=int(seed))
    return {split: len(dataset.match_tags(split)) for split in fractions}


def export_ultralytics(
    samples,
    export_dir: str | Path,
    classes: Sequence[str],
    *,
    gt_field: str = GT_FIELD,
    splits: Sequence[str] | None = None,
) -> Path:
    """Export in Ultralytics (YOLOv5) format; with ``splits`` each tagged split goes to its own folder,
    else everything to ``val``. Returns the ``dataset.yaml``."""
    import fiftyone as fo

    export_dir = Path(export_dir)
    classes = [str(c) for c in classes]  # numpy strings would be written to dataset.yaml as objects
    for split in splits or [None]:
        view = samples.match_tags(split) if split else samples
        view.export(
            export_dir=str(export_dir),
            dataset_type=fo.types.YOLOv5Dataset,
            label_field=gt_field,
            classes=classes,
            split=split or "val",
        )
    log.info("exported %d samples to %s", len(samples), export_dir)
    return export_dir / "dataset.yaml"


def curate_config(cfg: DictConfig) -> dict:
    """The ``fiftyone.curate`` group as plain values (for the functions above)."""
    return OmegaConf.to_container(cfg.fiftyone.curate, resolve=True)
