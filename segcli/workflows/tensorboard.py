"""TensorBoard event files for a training run (the optional extra ``segcli[tensorboard]``).

:func:`tensorboard_logger` wraps the run's event callback: ``"step"`` events give
``train/loss`` and ``train/lr``; ``"eval"`` events give ``val/mIoU``, ``val/mAcc``, ``val/aAcc``,
``val_IoU/<class>`` for every class, and prediction overlays of the first ``num_images``
validation images (``val/prediction_<i>``: image | prediction | ground truth, with the palette of
the checkpoints). Files go to ``WORK_DIR/tensorboard/``; the writer is created at the first event,
after every check of the run has passed, so a refused run writes nothing.

Decision: on by default (``train.tensorboard: true``) when the ``tensorboard`` package is
installed, and off with one warning saying how to get it when not: MMSegmentation users expect
curves without configuring anything, and ``segcli plot RUN_DIR`` draws the same curves without it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..data.transforms import image_tensor
from ..engine.inference import infer_labels
from ..viz import colorize, overlay_image

Callback = Callable[[str, dict], None]
INSTALL_HINT = "TensorBoard logging is off: install it with pip install 'segcli[tensorboard]'"


def tensorboard_available() -> bool:
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class TensorBoardLogger:
    """An event callback writing TensorBoard scalars and images (module docstring)."""

    def __init__(self, log_dir: Path, model, val_set, recipe, device, num_images: int = 2):
        self.log_dir, self.model, self.val_set, self.recipe = Path(log_dir), model, val_set, recipe
        self.device, self.num_images = device, num_images
        self.writer = None
        self.palette = np.asarray(val_set.palette, dtype=np.uint8)

    def _writer(self):
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.log_dir))
        return self.writer

    def __call__(self, event: str, info: dict) -> None:
        if event == "step":
            writer = self._writer()
            writer.add_scalar("train/loss", info["loss"], info["iter"])
            writer.add_scalar("train/lr", info["lr"], info["iter"])
        elif event == "eval":
            writer = self._writer()
            for key in ("mIoU", "mAcc", "aAcc"):
                if info.get(key) is not None and not np.isnan(info[key]):
                    writer.add_scalar(f"val/{key}", info[key], info["iter"])
            for row in info.get("per_class", ()):
                if row["IoU"] is not None and not np.isnan(row["IoU"]):
                    writer.add_scalar(f"val_IoU/{row['class']}", row["IoU"], info["iter"])
            for index, panel in enumerate(self._panels()):
                writer.add_image(f"val/prediction_{index}", panel, info["iter"], dataformats="HWC")
            writer.flush()
        elif event == "checkpoint" and self.writer is not None:
            self.writer.flush()

    @torch.no_grad()
    def _panels(self) -> list[np.ndarray]:
        """image | prediction overlay | ground-truth overlay, for the first validation images."""
        was_training = self.model.training
        self.model.eval()
        panels = []
        try:
            for index in range(min(self.num_images, len(self.val_set))):
                image, label = self.val_set.read(index)
                data = self.recipe.data
                tensor = image_tensor(image).to(self.device)  # [1, 3, H, W] uint8
                pred = infer_labels(self.model, tensor, self.recipe.test, data.crop_size, mean=data.mean,
                                    std=data.std)[0].cpu().numpy()
                truth = np.where(label == 255, 0, label)
                panels.append(np.concatenate([image, overlay_image(image, colorize(pred, self.palette)),
                                              overlay_image(image, colorize(truth, self.palette))], axis=1))
        finally:
            self.model.train(was_training)
        return panels

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def with_tensorboard(callback: Callback, logger: TensorBoardLogger) -> Callback:
    """``callback`` followed by ``logger`` for every event."""
    def both(event: str, info: dict) -> None:
        callback(event, info)
        logger(event, info)

    return both
