"""What the detector's own network sees in an image (nothing downloaded): embeddings and fingerprints.

Two views of an image, both read from the detector's layers by forward hooks while Ultralytics'
predictor runs (so images are read, letterboxed and normalised exactly as for prediction):

* the **embedding**: the global average of one or more layers' feature maps (by default the
  backbone's last layer, SPPF in YOLOv8/11), concatenated. What the detector makes of the image as a
  whole; distances to the anchor's embeddings measure how new an image is to the model.
* the **fingerprint**: one early layer's feature maps averaged over a ``grid`` x ``grid`` grid, each
  channel centred and scaled over the grid, then the whole scaled to unit length. The cosine of two
  fingerprints is the mean correlation of that layer's channels across the page: the layout of one
  particular image, so a slightly perturbed copy (re-encoded, brighter, noisier) stays close to its
  original while other pages of the same kind do not. The pooled embedding cannot do that: a model
  that sees little on a degraded domain maps all its pages to one tight cluster.

:meth:`Embedder.embed` and :meth:`Embedder.fingerprint` stop the forward pass after the last layer
they need (Ultralytics' ``embed=[layer]``); :meth:`Embedder.predict` runs the whole model once and
returns the detections with both views of the same pass. Letterboxing is always square
(``rect=False``): an image's results do not depend on the images it shares a batch with. Results are
matched to the images by path (Ultralytics sorts a list source); an image it cannot decode raises
BadInput naming it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from detloop.core.errors import BadInput
from detloop.model.yolo import load_model

log = logging.getLogger(__name__)

EMBEDDING, FINGERPRINT = "embedding", "fingerprint"


@dataclass(frozen=True, eq=False)
class Found:
    """A model's detections on one image: normalized xyxy boxes (N, 4), class ids (N,), confidences (N,)."""

    boxes: np.ndarray
    cls: np.ndarray
    conf: np.ndarray


@dataclass(frozen=True, eq=False)
class Views:
    """Per image (rows in the images' order): detections, embeddings (N, D), unit fingerprints (N, F)."""

    found: list[Found]
    embeddings: np.ndarray
    fingerprints: np.ndarray


def _found(boxes) -> Found:
    return Found(boxes.xyxyn.cpu().numpy(), boxes.cls.cpu().numpy().astype(np.int64), boxes.conf.cpu().numpy())


def backbone_last_layer(model) -> int:
    """Index of the backbone's last layer of an Ultralytics model (from its yaml's ``backbone`` list)."""
    spec = getattr(model.model, "yaml", None) or {}
    backbone = spec.get("backbone") if isinstance(spec, dict) else None
    if not backbone:
        raise BadInput(
            "the model's architecture names no backbone (model.yaml['backbone'])",
            ["set inbox.queue.embed_layers to the layer indices to embed, e.g. [9]"],
        )
    return len(backbone) - 1


def unit_fingerprints(grids: np.ndarray) -> np.ndarray:
    """(N, C, g*g) grid-pooled feature maps -> (N, C*g*g) unit fingerprints: each channel centred and
    scaled over the grid (a flat channel contributes nothing), then each row scaled to unit length."""
    x = np.asarray(grids, dtype=np.float64)
    x = x - x.mean(axis=2, keepdims=True)
    norms = np.linalg.norm(x, axis=2, keepdims=True)
    x = np.divide(x, norms, out=np.zeros_like(x), where=norms > 1e-12).reshape(len(x), -1)
    rows = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, rows, out=np.zeros_like(x), where=rows > 0).astype(np.float32)


class Embedder:
    """Embeddings, fingerprints and detections of one weights file at one input size.

    ``imgsz``: the input size; None = the size the weights were trained at (640 when they do not say).
    ``layers``: layer indices whose globally pooled outputs make the embedding; None = the backbone's
    last layer. ``fingerprint_layer`` / ``fingerprint_grid``: the fingerprint's layer and grid.
    ``batch`` images go through the network at a time; ``device`` as Ultralytics names it.
    """

    def __init__(
        self,
        weights: str | Path,
        *,
        imgsz: int | None = None,
        batch: int = 16,
        device: str | int | None = None,
        layers: Sequence[int] | None = None,
        fingerprint_layer: int = 2,
        fingerprint_grid: int = 16,
    ) -> None:
        if batch < 1:
            raise BadInput(f"embedding batch {batch}: must be >= 1")
        if fingerprint_grid < 1:
            raise BadInput(f"fingerprint grid {fingerprint_grid}: must be >= 1")
        self.model = load_model(weights)
        self.layers = sorted({int(i) for i in layers}) if layers else [backbone_last_layer(self.model)]
        self.fingerprint_layer, self.grid = int(fingerprint_layer), int(fingerprint_grid)
        heads = len(self.model.model.model) - 1  # the last layer is the head
        bad = [i for i in [*self.layers, self.fingerprint_layer] if not 0 <= i < heads]
        if bad:
            raise BadInput(f"embedding / fingerprint layers {bad}: the model has layers 0..{heads - 1} before its head")
        if imgsz is None:
            train_args = (getattr(self.model, "ckpt", None) or {}).get("train_args") or {}
            imgsz = int(train_args.get("imgsz") or 640)
        self.args = {"imgsz": int(imgsz), "batch": int(batch), "device": device, "rect": False, "verbose": False}
        self._paths: list[str] = []  # the paths of the batch in the network now
        self._captured: dict[str, dict[int, dict[str, np.ndarray]]] = {EMBEDDING: {}, FINGERPRINT: {}}
        self.model.add_callback("on_predict_start", self._hook_network)
        self.model.add_callback("on_predict_batch_start", self._remember_batch)

    @property
    def key(self) -> str:
        """What the results depend on besides the weights: layers, fingerprint and input size (``L9-F2g8-i160``)."""
        layers = "_".join(map(str, self.layers))
        return f"L{layers}-F{self.fingerprint_layer}g{self.grid}-i{self.args['imgsz']}"

    def embed(self, images: Sequence[str | Path]) -> np.ndarray:
        """(N, D) float32 embeddings of ``images``, in their order (the head never runs)."""
        paths = self._run(images, stop=max(self.layers))
        return self._embeddings(paths)

    def fingerprint(self, images: Sequence[str | Path]) -> np.ndarray:
        """(N, F) unit fingerprints of ``images``, in their order (the network stops at the fingerprint layer)."""
        paths = self._run(images, stop=self.fingerprint_layer)
        return self._fingerprints(paths)

    def predict(self, images: Sequence[str | Path], *, conf: float, iou: float, max_det: int) -> Views:
        """One prediction pass: per image its detections down to ``conf`` (NMS at ``iou``, ``max_det`` per
        image) with the embedding and the fingerprint of the same forward pass."""
        found: dict[str, Found] = {}
        args = {"conf": float(conf), "iou": float(iou), "max_det": int(max_det)}
        paths = self._run(images, stop=None, found=found, **args)
        return Views([found[p] for p in paths], self._embeddings(paths), self._fingerprints(paths))

    # ------------------------------------------------------------------ the passes

    def _run(self, images: Sequence[str | Path], stop: int | None, found: dict | None = None, **args) -> list[str]:
        """Run the predictor over ``images`` in batches (stopping after layer ``stop``, or the whole model
        with detections kept in ``found``); returns the images' absolute paths, checked."""
        paths = [Path(p).absolute() for p in images]
        missing = [f"{p}: image file not found" for p in paths if not p.is_file()]
        if missing:
            raise BadInput(f"{len(paths)} images for the detector: {len(missing)} missing", missing)
        for kind in self._captured.values():
            kind.clear()
        if not paths:
            return []
        from tqdm import tqdm

        embed = {"embed": [stop]} if stop is not None else {}
        what = "predict + embed" if stop is None else "embed" if stop == max(self.layers) else "fingerprint"
        with tqdm(total=len(paths), desc=what, unit="img", disable=None, leave=False) as bar:
            for start in range(0, len(paths), self.args["batch"]):
                chunk = [str(p) for p in paths[start : start + self.args["batch"]]]
                for result in self.model.predict(source=chunk, stream=True, **self.args, **embed, **args):
                    if found is not None:
                        found[str(result.path)] = _found(result.boxes)
                bar.update(len(chunk))
        keys = [str(p) for p in paths]
        some = next(iter(self._captured[EMBEDDING].values()), None) or next(iter(self._captured[FINGERPRINT].values()))
        unread = [f"{p}: cannot be decoded as an image" for p in keys if p not in some]
        if unread:
            raise BadInput(f"the detector could not read {len(unread)} images", unread)
        return keys

    def _embeddings(self, paths: list[str]) -> np.ndarray:
        parts = self._captured[EMBEDDING]
        if not paths:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([np.concatenate([parts[i][p] for i in self.layers]) for p in paths]).astype(np.float32)

    def _fingerprints(self, paths: list[str]) -> np.ndarray:
        if not paths:
            return np.zeros((0, 0), dtype=np.float32)
        grids = self._captured[FINGERPRINT][self.fingerprint_layer]
        return unit_fingerprints(np.stack([grids[p] for p in paths]))

    # ------------------------------------------------------------------ Ultralytics callbacks and hooks

    def _remember_batch(self, predictor) -> None:
        self._paths = [str(p) for p in predictor.batch[0]]

    def _hook_network(self, predictor) -> None:
        """Once per predictor: forward hooks that keep each image's pooled outputs of the hooked layers."""
        network = predictor.model.model  # AutoBackend -> the (fused) Ultralytics model
        if getattr(network, "_detloop_hooks", None) is self:
            return
        layers = network.model
        for index in self.layers:
            layers[index].register_forward_hook(self._hook(EMBEDDING, index, 1))
        layers[self.fingerprint_layer].register_forward_hook(self._hook(FINGERPRINT, self.fingerprint_layer, self.grid))
        network._detloop_hooks = self

    def _hook(self, kind: str, index: int, grid: int):
        def keep(_module, _inputs, output) -> None:
            import torch

            pooled = torch.nn.functional.adaptive_avg_pool2d(output, (grid, grid)).flatten(2).float().cpu().numpy()
            found = self._captured[kind].setdefault(index, {})
            for path, value in zip(self._paths, pooled, strict=True):
                found[path] = value if grid > 1 else value[:, 0]

        return keep
