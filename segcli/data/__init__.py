"""Data: datasets (registered in ``segcli.registry.DATASETS``), transforms and loaders.

Importing this package registers every dataset type. :func:`build_dataset` is the one door in:
``build_dataset(recipe.data, "train")`` returns a :class:`SegDataset` with the split's transform
attached (``TrainTransform`` for "train", ``EvalTransform`` at the original size for "val").
"""
from __future__ import annotations

from ..registry import DATASETS
from . import datasets, synthetic  # noqa: F401  (register the dataset types)
from .datasets import SampleKey, SegDataset, read_image, read_mask, reduce_zero_label_lut
from .loader import build_eval_loader, build_train_loader, collate, global_batch
from .synthetic import SYNTHETIC_CLASSES, SYNTHETIC_PALETTE, generate_synthetic, render_scene
from .transforms import IGNORE_INDEX, EvalTransform, TrainTransform


def dataset_classes(data_cfg) -> tuple[str, ...]:
    """The class names a recipe's dataset has, without reading its images: ``data.classes``, else
    the list the dataset type registered (``folder``: ``ROOT/classes.txt``)."""
    if data_cfg.classes:
        return tuple(data_cfg.classes)
    classes = DATASETS.get(data_cfg.type, "data.type").classes
    return tuple(classes(data_cfg) if callable(classes) else classes)


def build_dataset(data_cfg, split: str, labelled: bool = True) -> SegDataset:
    """The dataset of ``data_cfg.type`` for logical split "train" or "val"; ``labelled`` False reads
    the split's images alone (no mask needed: a benchmark's test split, ``eval --format-only``)."""
    return DATASETS.get(data_cfg.type, "data.type").builder(data_cfg, split, labelled=labelled)


__all__ = [
    "IGNORE_INDEX", "SYNTHETIC_CLASSES", "SYNTHETIC_PALETTE", "EvalTransform", "SampleKey", "SegDataset",
    "TrainTransform", "build_dataset", "dataset_classes", "build_eval_loader", "build_train_loader", "collate",
    "generate_synthetic", "global_batch", "read_image", "read_mask", "reduce_zero_label_lut", "render_scene",
]
