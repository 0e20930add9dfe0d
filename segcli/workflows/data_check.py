"""Checking a recipe's dataset in one pass (``segcli data check``).

Training stops at the first bad file it meets; this reads every image and mask of every split once
and reports every problem together (unpaired files and missing folders, unreadable files, a mask
whose size is not its image's, label values that are no class id), with the class histogram of
the labels it read, so a dataset is fixed in one round trip.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..build import as_recipe
from ..data import IGNORE_INDEX, build_dataset, dataset_classes
from ..errors import SegcliError
from ..recipe import Recipe


@dataclass
class DataCheckResult:
    classes: tuple[str, ...]
    images: dict[str, int]  # split -> samples found (0 where the split could not be listed)
    pixels: list[int]  # per class, over every mask read (after the label mapping)
    ignored_pixels: int
    problems: list[tuple[str, str]] = field(default_factory=list)  # (file or folder, what is wrong)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        """The ``data check --json`` object."""
        return {"ok": self.ok, "images": self.images, "classes": list(self.classes), "pixels": self.pixels,
                "ignored_pixels": self.ignored_pixels,
                "problems": [{"where": where, "problem": problem} for where, problem in self.problems]}


def check_data(recipe: Recipe | str | Path, overrides=(), splits: tuple[str, ...] = ("train", "val"),
               progress: Callable[[str, int, int], None] | None = None) -> DataCheckResult:
    """Read every sample of ``splits`` once; collect every problem instead of stopping at the first.

    ``progress(split, done, total)`` is called after each sample.
    """
    recipe = as_recipe(recipe, overrides)
    classes = tuple(dataset_classes(recipe.data))
    result = DataCheckResult(classes, {}, [0] * len(classes), 0)
    pixels = np.zeros(len(classes), dtype=np.int64)
    for split in splits:
        try:
            dataset = build_dataset(recipe.data, split)
        except SegcliError as err:  # a missing folder, unpaired files: the split cannot be listed
            result.images[split] = 0
            result.problems.append((err.where or split, err.message + (f" ({err.hint})" if err.hint else "")))
            continue
        result.images[split] = len(dataset)
        for index in range(len(dataset)):
            try:
                _, label = dataset.read(index)
            except SegcliError as err:
                result.problems.append((err.where or dataset.samples[index][0], err.message))
            else:
                valid = label[label != IGNORE_INDEX]
                pixels += np.bincount(valid.ravel(), minlength=len(classes))[: len(classes)]
                result.ignored_pixels += int(label.size - valid.size)
            if progress is not None:
                progress(split, index + 1, len(dataset))
    result.pixels = pixels.tolist()
    return result
