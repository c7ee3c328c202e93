"""The gate's evaluator: one prediction pass per model and image set, then COCO mAP and detection rate.

``gate`` compares a candidate and the production model on the same sets with these functions, so
both are measured the same way:

* :func:`load_ground_truth` reads YOLO labels as pixel boxes (image size from the file header),
* :func:`predict` runs a model once over a set (Ultralytics, low confidence, original pixel coords),
* :func:`coco_map` computes COCO-style AP exactly as pycocotools ``COCOeval`` (bbox, IoU 0.50:0.95,
  101 recall points, 100 detections per image and class, area range *all*, no crowd), vectorized,
* :func:`evaluate_predictions` adds the detection rate at the serving confidence
  (:mod:`detloop.evaluation.metrics`) and :func:`evaluate_set` does all of it for one weights file.

Predictions are plain arrays (:class:`Detections`), so a caller can predict once and evaluate the
same predictions again (another class subset, another serving confidence) without inference.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from detloop.core.errors import BadInput
from detloop.data.yolo_format import label_path_for, parse_label_file
from detloop.evaluation.metrics import detection_rate, yolo_labels_xyxy

log = logging.getLogger(__name__)

# pycocotools' Params for iouType="bbox", written the same way so the floats are identical.
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
MAX_DETS = 100  # per image and class, highest score first (pycocotools maxDets[-1])
AREA_ALL = (0.0, 1e5**2)  # area range "all": unmatched detections outside it are ignored, not false positives
NO_GT = -1.0  # AP of a class without ground truth (pycocotools' -1); such classes are left out of the mean
CHUNK_ELEMENTS = 1 << 22  # groups x thresholds x objects per matching step: bounds memory (~32 MB)
EXIF_ORIENTATION = 0x0112
EXIF_TRANSPOSED = frozenset({5, 6, 7, 8})  # orientations that swap width and height


@dataclass(frozen=True, eq=False)
class GroundTruth:
    """The labelled objects of one image: pixel xyxy boxes (N, 4) and class ids (N,)."""

    boxes: np.ndarray
    cls: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "boxes", np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4))
        object.__setattr__(self, "cls", np.asarray(self.cls, dtype=np.int64).reshape(-1))
        if len(self.boxes) != len(self.cls):
            raise ValueError(f"GroundTruth: {len(self.boxes)} boxes but {len(self.cls)} class ids")


@dataclass(frozen=True, eq=False)
class Detections:
    """A model's predictions on one image: pixel xyxy boxes (N, 4), class ids (N,), confidences (N,)."""

    boxes: np.ndarray
    cls: np.ndarray
    conf: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "boxes", np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4))
        object.__setattr__(self, "cls", np.asarray(self.cls, dtype=np.int64).reshape(-1))
        object.__setattr__(self, "conf", np.asarray(self.conf, dtype=np.float64).reshape(-1))
        if not len(self.boxes) == len(self.cls) == len(self.conf):
            raise ValueError(
                f"Detections: {len(self.boxes)} boxes, {len(self.cls)} class ids, {len(self.conf)} confidences"
            )


def label_path(image: str | Path) -> Path:
    """The label file of an image (Ultralytics: last ``/images/`` -> ``/labels/``, suffix ``.txt``)."""
    return label_path_for(image)


# ------------------------------------------------------------------------------------ ground truth
def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as Ultralytics sees the image: read from the header (no pixel decoding), with
    width and height swapped for EXIF orientations 5-8 (OpenCV applies the rotation when it loads)."""
    from PIL import Image

    with Image.open(path) as im:
        width, height = im.size
        try:
            transposed = im.getexif().get(EXIF_ORIENTATION) in EXIF_TRANSPOSED
        except Exception:  # a broken EXIF block: Ultralytics ignores it as well
            transposed = False
    return (height, width) if transposed else (width, height)


def _read_size(path: Path) -> tuple[tuple[int, int] | None, str | None]:
    """(width, height) of an image, or None and why it cannot be read."""
    if not path.is_file():
        return None, f"{path}: image file not found"
    try:
        return image_size(path), None
    except ModuleNotFoundError:  # Ultralytics' Image.open patch tries pi-heif for unidentified files
        return None, f"{path}: cannot be read as an image (not a format PIL identifies)"
    except Exception as err:  # PIL raises OSError, UnidentifiedImageError, ValueError ... for bad files
        return None, f"{path}: cannot be read as an image ({type(err).__name__}: {err})"


def load_ground_truth(images: Sequence[str | Path], *, num_classes: int | None = None) -> list[GroundTruth]:
    """The labelled objects of each image (label file by :func:`label_path`; missing = no objects).

    Labels are checked with the project's rules (:func:`detloop.data.yolo_format.parse_label_file`:
    ``class xc yc w h``, normalized, class id an integer below ``num_classes`` when given). Raises
    BadInput listing every unreadable image and every malformed label line (file and line number).
    """
    bound = num_classes if num_classes is not None else math.inf
    problems: list[str] = []
    out: list[GroundTruth] = []
    for image in map(Path, images):
        size, unreadable = _read_size(image)
        if size is None:
            problems.append(str(unreadable))
            continue
        labels = label_path(image)
        if labels.is_file():
            problems += parse_label_file(labels, bound)[1]
        if problems:
            continue
        try:
            boxes, cls = yolo_labels_xyxy(labels, *size)
        except ValueError as err:  # e.g. a byte-order mark that the rule check accepts
            problems.append(f"{labels}: cannot be read as YOLO labels ({err})")
            continue
        out.append(GroundTruth(boxes, cls))
    if problems:
        raise BadInput(f"ground truth of {len(images)} images: {len(problems)} problems", problems)
    return out


# --------------------------------------------------------------------------------------- inference
def predict(
    weights: str | Path,
    images: Sequence[str | Path],
    *,
    imgsz: int,
    batch: int = 16,
    device: str | int | None = None,
    conf: float = 0.001,
    iou: float = 0.7,
    max_det: int = 300,
) -> list[Detections]:
    """One prediction pass of ``weights`` over ``images`` (in order), boxes in original pixel coords.

    The defaults are Ultralytics' validation settings (conf 0.001, NMS IoU 0.7, 300 per image), so
    the whole precision-recall curve is available to :func:`coco_map`. Images go to Ultralytics in
    chunks of ``batch`` file paths; an image it cannot decode raises BadInput naming the file.

    Ultralytics letterboxes a batch of equal-sized images to the smallest padded rectangle but a
    batch of mixed sizes to a square, so an image's detections can depend on its chunk mates: to
    compare models, predict the same image list with the same ``batch``.
    """
    from tqdm import tqdm

    from detloop.model.runtime import load_detector

    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    paths = [Path(p) for p in images]
    unreadable = [problem for _, problem in map(_read_size, paths) if problem]
    if unreadable:
        raise BadInput(f"prediction on {len(paths)} images: {len(unreadable)} cannot be read", unreadable)
    model = load_detector(weights, imgsz=imgsz, device=device)  # a .pt, or an .onnx export on ONNX Runtime
    args = dict(imgsz=imgsz, batch=batch, conf=conf, iou=iou, max_det=max_det, device=device)
    out: list[Detections] = []
    with tqdm(total=len(paths), desc=f"predict {Path(weights).name}", unit="img", disable=None) as bar:
        for start in range(0, len(paths), batch):
            chunk = paths[start : start + batch]
            out += _predict_chunk(model, chunk, args)
            bar.update(len(chunk))
    return out


def _predict_chunk(model, chunk: list[Path], args: dict) -> list[Detections]:
    """Detections of one chunk in the chunk's order (Ultralytics sorts a list source and skips images
    it cannot decode, so results are matched back by their absolute path)."""
    by_path: dict[str, Detections] = {}
    for result in model.predict(source=[str(p) for p in chunk], stream=True, verbose=False, **args):
        boxes = result.boxes
        by_path[str(result.path)] = Detections(
            boxes.xyxy.cpu().numpy(), boxes.cls.cpu().numpy().astype(np.int64), boxes.conf.cpu().numpy()
        )
    keys = [str(p.absolute()) for p in chunk]
    unread = [f"{p}: cannot be decoded as an image" for p, key in zip(chunk, keys, strict=True) if key not in by_path]
    if unread:
        raise BadInput(f"prediction: {len(unread)} images could not be read", unread)
    return [by_path[key] for key in keys]


# -------------------------------------------------------------------------------------------- mAP
@dataclass(frozen=True)
class _Flat:
    """All boxes of a set in one array, with the image and class index (into ``class_ids``) of each."""

    xywh: np.ndarray  # (N, 4) x, y, w, h as pycocotools stores them
    img: np.ndarray
    k: np.ndarray
    conf: np.ndarray | None

    def take(self, idx: np.ndarray) -> _Flat:
        return _Flat(self.xywh[idx], self.img[idx], self.k[idx], None if self.conf is None else self.conf[idx])


def _flatten(items: Sequence[GroundTruth] | Sequence[Detections], classes: np.ndarray, scored: bool) -> _Flat:
    """Concatenate per-image boxes (and scores if ``scored``), keeping only classes in ``classes``."""
    counts = np.fromiter((len(x.cls) for x in items), dtype=np.int64, count=len(items))
    total = int(counts.sum())
    boxes = np.concatenate([x.boxes for x in items]) if total else np.zeros((0, 4))
    cls = np.concatenate([x.cls for x in items]) if total else np.zeros(0, dtype=np.int64)
    conf = None
    if scored:
        conf = np.concatenate([x.conf for x in items]) if total else np.zeros(0)
    img = np.repeat(np.arange(len(items)), counts)
    k = np.searchsorted(classes, cls)
    keep = k < len(classes)
    keep[keep] = classes[k[keep]] == cls[keep]
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    flat = _Flat(xywh, img, k, conf)
    return flat if keep.all() else flat.take(np.flatnonzero(keep))


def _top_detections(dt: _Flat, n_images: int, max_dets: int) -> tuple[_Flat, np.ndarray]:
    """Detections sorted by (class, image, score desc, input order), the best ``max_dets`` of each
    image and class kept (pycocotools' stable sort); also returns the (class, image) group keys."""
    group = dt.k * n_images + dt.img
    order = np.argsort(-dt.conf, kind="stable")
    small = group.astype(np.uint16) if n_images * (int(dt.k.max(initial=0)) + 1) <= 2**16 else group
    order = order[np.argsort(small[order], kind="stable")]  # = lexsort((-conf, group)), radix sort when small
    group = group[order]
    first = np.ones(len(group), dtype=bool)
    first[1:] = group[1:] != group[:-1]
    pos = np.arange(len(group))
    rank = pos - np.maximum.accumulate(np.where(first, pos, 0))
    keep = rank < max_dets
    return dt.take(order[keep]), group[keep]


def _pair_iou(d: np.ndarray, g: np.ndarray) -> np.ndarray:
    """IoU of paired xywh boxes, computed as pycocotools' ``bbIou`` does (no +1, x + w as the far edge)."""
    w = np.minimum(d[:, 0] + d[:, 2], g[:, 0] + g[:, 2]) - np.maximum(d[:, 0], g[:, 0])
    h = np.minimum(d[:, 1] + d[:, 3], g[:, 1] + g[:, 3]) - np.maximum(d[:, 1], g[:, 1])
    overlap = (w > 0) & (h > 0)
    inter = np.where(overlap, w * h, 0.0)
    union = d[:, 2] * d[:, 3] + g[:, 2] * g[:, 3] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=overlap)


def _match(dt: _Flat, dt_group: np.ndarray, gt: _Flat, n_images: int) -> np.ndarray:
    """(T, N_dt) bool: is each detection matched at each IoU threshold (pycocotools' greedy matching).

    Per image and class, detections in score order take the unmatched ground truth of highest IoU
    (the last of equals) if it reaches the threshold. Only pairs with IoU >= 0.5 can ever match, so
    only those are kept; the greedy loop then runs over a detection's rank among its group's
    candidates, vectorized across all (image, class) groups and thresholds at once.
    """
    matched = np.zeros((len(IOU_THRESHOLDS), len(dt.k)), dtype=bool)
    pair_dt, pair_gt, pair_iou = _useful_pairs(dt, dt_group, gt, n_images)
    if len(pair_dt):
        _greedy_match(matched, _steps(pair_dt, pair_gt, pair_iou, dt_group))
    return matched


def _useful_pairs(dt: _Flat, dt_group: np.ndarray, gt: _Flat, n_images: int) -> tuple[np.ndarray, ...]:
    """(detection, object, IoU) of every pair in the same image and class with IoU >= 0.5, ordered by
    detection; an object is named by its position among its group's objects (label order)."""
    gt_group = gt.k * n_images + gt.img
    gt_order = np.argsort(gt_group, kind="stable")
    gt_group_sorted = gt_group[gt_order]
    lo = np.searchsorted(gt_group_sorted, dt_group, side="left")
    count = np.searchsorted(gt_group_sorted, dt_group, side="right") - lo
    total = int(count.sum())
    pair_dt = np.repeat(np.arange(len(dt_group)), count)
    pair_gt = np.arange(total) - np.repeat(np.cumsum(count) - count, count)
    pair_iou = _pair_iou(dt.xywh[pair_dt], gt.xywh[gt_order[np.repeat(lo, count) + pair_gt]])
    useful = pair_iou >= IOU_THRESHOLDS[0]
    return pair_dt[useful], pair_gt[useful], pair_iou[useful]


def _first_of_runs(values: np.ndarray) -> np.ndarray:
    first = np.ones(len(values), dtype=bool)
    first[1:] = values[1:] != values[:-1]
    return first


@dataclass(frozen=True)
class _Steps:
    """Useful pairs laid out for the greedy loop.

    Each (image, class) group with candidates gets a slot; slots are ordered by number of candidates,
    most first, so step ``d`` (every group's d-th candidate by score) concerns slots ``0..active[d]``.
    Pairs and candidates are sorted by (step, slot); objects are renumbered 0.. within their group.
    """

    n_cand: np.ndarray  # per slot
    n_obj: np.ndarray  # per slot: objects with a useful pair
    active: np.ndarray  # per step: number of slots with a candidate at that step
    pair_slot: np.ndarray
    pair_obj: np.ndarray
    pair_iou: np.ndarray
    pair_start: np.ndarray  # per step (and one past the end): first pair of that step
    cand: np.ndarray  # detection index of each candidate
    cand_start: np.ndarray  # per step: first candidate of that step


def _steps(pair_dt: np.ndarray, pair_gt: np.ndarray, pair_iou: np.ndarray, dt_group: np.ndarray) -> _Steps:
    cand = pair_dt[_first_of_runs(pair_dt)]  # detections with a useful pair, in (class, image, score) order
    new_group = _first_of_runs(dt_group[cand])
    group = np.cumsum(new_group) - 1
    starts = np.flatnonzero(new_group)
    rank = np.arange(len(cand)) - starts[group]  # score rank among the group's candidates = step
    n_cand = np.diff(np.append(starts, len(cand)))
    by_size = np.argsort(-n_cand, kind="stable")
    slot = np.empty_like(by_size)
    slot[by_size] = np.arange(len(by_size))
    n_cand = n_cand[by_size]
    n_steps = int(n_cand[0])

    pair_cand = np.searchsorted(cand, pair_dt)
    pair_slot = slot[group[pair_cand]]
    stride = int(pair_gt.max()) + 1  # objects renumbered within their group, order kept (it breaks IoU ties)
    objects, pair_obj = np.unique(pair_slot * stride + pair_gt, return_inverse=True)
    obj_first = np.searchsorted(objects // stride, np.arange(len(n_cand)))
    pair_obj = pair_obj - obj_first[pair_slot]

    pair_rank = rank[pair_cand]
    by_step = np.lexsort((pair_slot, pair_rank))
    return _Steps(
        n_cand=n_cand,
        n_obj=np.diff(np.append(obj_first, len(objects))),
        active=np.searchsorted(-n_cand, -np.arange(n_steps), side="left"),
        pair_slot=pair_slot[by_step],
        pair_obj=pair_obj[by_step],
        pair_iou=pair_iou[by_step],
        pair_start=np.searchsorted(pair_rank[by_step], np.arange(n_steps + 1)),
        cand=cand[np.lexsort((slot[group], rank))],
        cand_start=np.searchsorted(np.sort(rank), np.arange(n_steps)),
    )


def _greedy_match(matched: np.ndarray, st: _Steps) -> None:
    """Fill ``matched`` step by step; slots go in chunks that bound memory (slots x T x objects)."""
    thresholds = np.minimum(IOU_THRESHOLDS, 1 - 1e-10)
    chunk = max(1, CHUNK_ELEMENTS // (len(thresholds) * int(st.n_obj.max())))
    for s0 in range(0, len(st.n_cand), chunk):
        s1 = min(s0 + chunk, len(st.n_cand))
        width = int(st.n_obj[s0:s1].max())
        taken = np.zeros((s1 - s0, len(thresholds), width), dtype=bool)
        for d in range(int(st.n_cand[s0])):
            n = int(min(st.active[d], s1)) - s0
            lo, hi = st.pair_start[d], st.pair_start[d + 1]
            a, b = lo + np.searchsorted(st.pair_slot[lo:hi], [s0, s0 + n])
            ious = np.full((n, width), -1.0)
            ious[st.pair_slot[a:b] - s0, st.pair_obj[a:b]] = st.pair_iou[a:b]
            masked = np.where(taken[:n], -1.0, ious[:, None, :])  # (n, T, objects)
            best_obj = width - 1 - masked[:, :, ::-1].argmax(axis=2)  # the last of equal IoUs, as pycocotools
            best = np.take_along_axis(masked, best_obj[:, :, None], axis=2)[:, :, 0]
            hit = best >= thresholds
            g_idx, t_idx = np.nonzero(hit)
            taken[g_idx, t_idx, best_obj[g_idx, t_idx]] = True
            first = st.cand_start[d] + s0
            matched[:, st.cand[first : first + n]] = hit.T


def _average_precision(matched: np.ndarray, dt: _Flat, n_gt: np.ndarray) -> np.ndarray:
    """(K, T) AP per class and IoU threshold as pycocotools' ``accumulate`` (101-point interpolated
    precision envelope); ``NO_GT`` for classes without ground truth. ``dt`` is sorted by class."""
    n_classes, n_thr = len(n_gt), len(IOU_THRESHOLDS)
    ap = np.full((n_classes, n_thr), NO_GT)
    bounds = np.searchsorted(dt.k, np.arange(n_classes + 1))
    area = dt.xywh[:, 2] * dt.xywh[:, 3]
    counted = (area >= AREA_ALL[0]) & (area <= AREA_ALL[1])  # unmatched detections outside are ignored
    for k in np.flatnonzero(n_gt > 0).tolist():
        lo, hi = int(bounds[k]), int(bounds[k + 1])
        rank = np.argsort(-dt.conf[lo:hi], kind="stable")  # score order; ties keep (image, input) order
        position = np.empty_like(rank)
        position[rank] = np.arange(hi - lo)
        all_counted = bool(counted[lo:hi].all())
        for t in range(n_thr):
            hits = matched[t, lo:hi]
            tp_at = np.sort(position[np.flatnonzero(hits)])
            # detections counted (true or false positive) up to each true positive
            seen = tp_at + 1 if all_counted else np.cumsum((counted[lo:hi] | hits)[rank])[tp_at]
            ap[k, t] = _interpolated_ap(tp_at.size, seen, int(n_gt[k]))
    return ap


def _interpolated_ap(n_tp: int, seen: np.ndarray, n_gt: int) -> float:
    """Mean of the precision envelope at the 101 recall thresholds (0 beyond the highest recall).

    The envelope at a recall threshold is the best precision at or after the first detection that
    reaches it, which is always attained at a true positive; so only true positives are evaluated.
    ``seen[i]`` is the number of counted detections up to the i-th true positive.
    """
    if n_tp == 0:
        return 0.0
    tp = np.arange(1, n_tp + 1, dtype=np.float64)
    fp = seen - tp
    precision = tp / (fp + tp + np.spacing(1))  # the same float operations as pycocotools
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.searchsorted(tp / n_gt, RECALL_THRESHOLDS, side="left")
    return float(np.where(idx < n_tp, precision[np.minimum(idx, n_tp - 1)], 0.0).mean())


def coco_map(
    gts: Sequence[GroundTruth], dets: Sequence[Detections], class_ids: Iterable[int], *, max_dets: int = MAX_DETS
) -> dict:
    """COCO bbox AP of ``dets`` against ``gts`` (per image, same order), as pycocotools ``COCOeval``.

    IoU thresholds 0.50:0.05:0.95, 101-point interpolated precision, the ``max_dets`` best
    detections per image and class, area range *all*, no crowd objects. Objects and detections of
    classes outside ``class_ids`` are ignored. A class without ground truth gets AP ``NO_GT`` (-1)
    and is left out of the means; ``map50``/``map50_95`` are ``NO_GT`` when no class has any.
    Equal to pycocotools up to float rounding (tests: 1e-9), except that an object is never ignored
    for its area (pycocotools ignores objects larger than 1e10 px², i.e. 100,000 px a side).

    Returns ``{"map50", "map50_95", "per_class": {class_id: {"ap50", "ap50_95", "n_gt"}}}``.
    """
    if len(gts) != len(dets):
        raise ValueError(f"coco_map: {len(gts)} ground-truth images but {len(dets)} prediction images")
    classes = np.unique(np.fromiter((int(c) for c in class_ids), dtype=np.int64))
    n_images = len(gts)
    gt = _flatten(gts, classes, scored=False)
    dt, dt_group = _top_detections(_flatten(dets, classes, scored=True), n_images, max_dets)
    n_gt = np.bincount(gt.k, minlength=len(classes))
    ap = _average_precision(_match(dt, dt_group, gt, n_images), dt, n_gt)
    has_gt = n_gt > 0
    per_class = {
        int(c): {"ap50": float(ap[k, 0]), "ap50_95": float(ap[k].mean()) if has_gt[k] else NO_GT, "n_gt": int(n_gt[k])}
        for k, c in enumerate(classes.tolist())
    }
    return {
        "map50": float(ap[has_gt, 0].mean()) if has_gt.any() else NO_GT,
        "map50_95": float(ap[has_gt].mean()) if has_gt.any() else NO_GT,
        "per_class": per_class,
    }


# ------------------------------------------------------------------------------------- evaluation
def evaluate_predictions(
    gts: Sequence[GroundTruth],
    dets: Sequence[Detections],
    names: dict[int, str],
    *,
    serving_conf: float = 0.25,
    match_iou: float = 0.5,
) -> dict:
    """mAP (all detections) and detection rate (detections with conf >= ``serving_conf``, IoU >=
    ``match_iou``, class-aware and class-agnostic) of precomputed predictions; per class by name.

    Raises BadInput when the lists differ in length or the ground truth holds class ids ``names``
    does not know (they would silently drop out of mAP).
    """
    _check_inputs(gts, dets, names)
    started = time.perf_counter()
    coco = coco_map(gts, dets, names)
    samples = [(g.boxes, g.cls, d.boxes, d.cls, d.conf) for g, d in zip(gts, dets, strict=True)]
    rate = detection_rate(samples, names, iou=match_iou, conf=serving_conf, class_aware=True)
    rate_any = detection_rate(samples, names, iou=match_iou, conf=serving_conf, class_aware=False)
    metrics_s = time.perf_counter() - started
    return {
        "images": len(gts),
        "objects": int(sum(len(g.cls) for g in gts)),
        "detections": int(sum(len(d.cls) for d in dets)),
        "map50": coco["map50"],
        "map50_95": coco["map50_95"],
        "per_class": {names[c]: v for c, v in coco["per_class"].items()},
        "serving_conf": serving_conf,
        "match_iou": match_iou,
        "detection_rate": rate.as_dict(),
        "detection_rate_any_class": rate_any.as_dict(),
        "timings": {"metrics_s": metrics_s},
    }


def _check_inputs(gts: Sequence[GroundTruth], dets: Sequence[Detections], names: dict[int, str]) -> None:
    if not names:
        raise BadInput("evaluation: no class names given")
    if len(gts) != len(dets):
        raise BadInput(f"evaluation: {len(gts)} ground-truth images but predictions for {len(dets)}")
    seen = np.unique(np.concatenate([g.cls for g in gts])) if gts else np.zeros(0, dtype=np.int64)
    unknown = sorted(set(seen.tolist()) - set(names))
    if unknown:
        raise BadInput(
            f"evaluation: ground truth has class ids {unknown} that the model does not know",
            [f"the model's classes are {dict(sorted(names.items()))}"],
        )


def evaluate_set(
    weights: str | Path,
    images: Sequence[str | Path],
    names: dict[int, str],
    *,
    imgsz: int,
    batch: int = 16,
    device: str | int | None = None,
    serving_conf: float = 0.25,
    match_iou: float = 0.5,
) -> dict:
    """Evaluate ``weights`` on ``images`` (labels beside them): one prediction pass, then
    :func:`evaluate_predictions`; timings of ground-truth reading, inference and metrics."""
    if not images:
        raise BadInput("evaluation: the image set is empty")
    started = time.perf_counter()
    gts = load_ground_truth(images, num_classes=max(names) + 1 if names else None)
    ground_truth_s = time.perf_counter() - started
    started = time.perf_counter()
    dets = predict(weights, images, imgsz=imgsz, batch=batch, device=device)
    inference_s = time.perf_counter() - started
    result = evaluate_predictions(gts, dets, names, serving_conf=serving_conf, match_iou=match_iou)
    result["timings"] = {"ground_truth_s": ground_truth_s, "inference_s": inference_s, **result["timings"]}
    log.info(
        "%s on %d images: mAP50 %.4f, mAP50-95 %.4f, detection rate %.3f (inference %.1f s, metrics %.2f s)",
        Path(weights).name,
        len(images),
        result["map50"],
        result["map50_95"],
        result["detection_rate"]["rate"],
        inference_s,
        result["timings"]["metrics_s"],
    )
    return result
