"""The data of one continual-learning step: its training images and labels, and the evaluation view."""
from __future__ import annotations

from typing import Literal

import numpy as np

from ...data.datasets import SegDataset
from ...models.continual import BACKGROUND, IGNORE
from .protocol import Tasks, seen_classes


class TaskDataset(SegDataset):
    """Some images of a dataset with a second label mapping (global ids -> task labels) after its own."""

    def __init__(self, base: SegDataset, indices, task_lut: np.ndarray, name: str,
                 mean_classes: tuple[int, ...] | None = None):
        super().__init__([base.samples[i] for i in indices], base.classes, base.palette, base.label_lut,
                         base.transform, name)
        self.task_lut = np.asarray(task_lut, dtype=np.uint8)  # [256]
        self.mean_classes = mean_classes  # the classes an evaluation averages over (None = all)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, label = super().read(index)  # validated global ids
        return image, self.task_lut[label]

    def subset(self, indices) -> "TaskDataset":
        return TaskDataset(self, indices, self.task_lut, self.name, self.mean_classes)


def task_images(presence: np.ndarray, tasks: Tasks, task: int,
                setting: Literal["overlapped", "disjoint"] = "overlapped") -> np.ndarray:
    """Indices of the training images of ``task`` (1-based) under ``setting`` (module docstring)."""
    current = list(tasks[task - 1])
    future = [c for later in tasks[task:] for c in later]
    keep = presence[:, current].any(axis=1)  # [N]
    if setting == "disjoint" and future:
        keep &= ~presence[:, future].any(axis=1)
    return np.flatnonzero(keep)


def train_label_map(tasks: Tasks, task: int, background: Literal["negative", "ignore"] = "negative") -> np.ndarray:
    """``[256]`` uint8: task ``task``'s classes kept, other classes -> 254 (or 255), the rest as is."""
    lut = np.arange(256, dtype=np.uint8)
    others = [c for j, classes in enumerate(tasks) if j != task - 1 for c in classes]
    lut[others] = BACKGROUND if background == "negative" else IGNORE
    return lut


def task_train_dataset(dataset: SegDataset, presence: np.ndarray, tasks: Tasks, task: int,
                       setting: Literal["overlapped", "disjoint"] = "overlapped",
                       background: Literal["negative", "ignore"] = "negative") -> TaskDataset:
    """The training data of one step: its images, its classes, old and future classes as background."""
    indices = task_images(presence, tasks, task, setting)
    return TaskDataset(dataset, indices, train_label_map(tasks, task, background), f"{dataset.name}:task{task}")


def task_eval_dataset(dataset: SegDataset, tasks: Tasks, task: int) -> TaskDataset:
    """Every validation image with its full labels; only the classes learnt by step ``task`` enter
    the means (pixels of later classes still count against whatever the model predicts there)."""
    return TaskDataset(dataset, range(len(dataset)), np.arange(256, dtype=np.uint8), f"{dataset.name}:seen{task}",
                       mean_classes=seen_classes(tasks, task))


def cl_eval_dataset(meta: dict, dataset: SegDataset) -> SegDataset:
    """The dataset to evaluate a checkpoint on: the step-t view for a cl-step checkpoint, else unchanged."""
    info = meta.get("cl")
    if not info:
        return dataset
    tasks = tuple(tuple(t) for t in info["tasks"])
    return task_eval_dataset(dataset, tasks, int(info["task"]))
