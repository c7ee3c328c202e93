"""Stands in for one Ultralytics DDP worker (tests/integration/test_devices.py runs it as a subprocess).

``python rank_worker.py STATE [--group]`` with ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` set as
``torch.distributed.run`` sets them. It loads the trainer callbacks the way Ultralytics' DDP launch file
does (``torch_load`` of the cloudpickled state) and runs them, in Ultralytics' order, on a small stand-in
for the trainer: training start, two epochs, the final validation of best.pt, training end (main rank
only, as in Ultralytics). ``--group`` first joins a real gloo process group (``MASTER_ADDR``/``MASTER_PORT``),
as the workers' NCCL group, and prints the ranks' merged figures of ``merge_ranks`` as JSON.
"""

from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

import torch

LOSS_NAMES = ("box_loss", "cls_loss", "dfl_loss")


class Trainer:
    """The attributes of ``ultralytics.engine.trainer.BaseTrainer`` that detloop's callbacks read."""

    def __init__(self) -> None:
        self.epochs, self.epoch, self.stop = 2, 0, False
        self.device = torch.device("cpu")
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.args = SimpleNamespace(device="cpu", amp=True)  # asked for AMP ...
        self.amp = False  # ... and Ultralytics' check turned it off (always, on the CPU)
        self.tloss = torch.tensor([1.5, 2.5, 1.25])
        self.lr = {"lr/pg0": 0.01}
        self.metrics = {"metrics/mAP50(B)": 0.25, "val/box_loss": 1.75}

    def label_loss_items(self, loss_items=None, prefix="train"):
        return {f"{prefix}/{name}": float(value) for name, value in zip(LOSS_NAMES, loss_items, strict=True)}


def main(state_file: str, group: bool) -> None:
    from ultralytics.utils.patches import torch_load

    callbacks = torch_load(state_file, map_location="cpu")["callbacks"]
    if group:
        torch.distributed.init_process_group("gloo")
    rank = int(os.environ["RANK"])
    trainer = Trainer()

    def run(event: str) -> None:
        for callback in callbacks.get(event, []):
            callback(trainer)

    run("on_train_start")
    for epoch in range(trainer.epochs):
        trainer.epoch, trainer.stop = epoch, epoch + 1 >= trainer.epochs
        run("on_fit_epoch_end")
    trainer.metrics = {"metrics/mAP50(B)": 0.5, "val/box_loss": 1.5}  # best.pt's final validation
    trainer.epoch += 1
    run("on_fit_epoch_end")
    trainer.epoch -= 1
    if rank in {-1, 0}:
        run("on_train_end")
    if group:
        from detloop.model.yolo import merge_ranks

        print(json.dumps(merge_ranks({rank: rank + 1.0})))
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], "--group" in sys.argv[2:])
