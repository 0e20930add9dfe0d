"""The shared builders: device, recipe, datasets, model and checkpoints.

Every workflow (``segcli/workflows/``) builds what it needs through these functions, never
through :mod:`segcli.api`, so imports run one way: ``cli -> api -> workflows -> build -> engine ->
models / data -> recipe / registry / errors``.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .configurable import Component
from .data import build_dataset, dataset_classes
from .engine.checkpoint import load_model_state, read_checkpoint
from .errors import SegcliError
from .models import build_segmentor
from .recipe import Recipe, apply_overrides, load_recipe, recipe_from_dict

__all__ = ["AUG_TEST_RATIOS", "with_aug_test", "pick_device", "as_recipe", "build_datasets", "dataset_meta", "num_classes_of", "without_pretrained",
           "build_model", "LoadedModel", "load_checkpoint", "model_from_payload"]


def pick_device(name: str | None = None) -> torch.device:
    """``None`` = CUDA if available else CPU; under torchrun, CUDA device ``LOCAL_RANK``."""
    if name:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise SegcliError(f"unknown device '{name}'", "--device", "use cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SegcliError("CUDA is not available on this machine", "--device", "use --device cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def as_recipe(recipe: Recipe | str | Path, overrides=()) -> Recipe:
    """A :class:`Recipe` from a recipe object or file, with ``--set`` overrides applied (the one loader)."""
    if isinstance(recipe, Recipe):
        if overrides:
            return recipe_from_dict(apply_overrides(recipe.to_dict(), list(overrides)), where="recipe")
        return recipe
    return load_recipe(recipe, overrides)


def build_datasets(recipe: Recipe, splits=("train", "val")):
    """The recipe's datasets, with the training / evaluation transforms attached."""
    return tuple(build_dataset(recipe.data, split) for split in splits)


def dataset_meta(dataset) -> dict:
    """What a checkpoint records of its dataset: class names, palette, class count, ignore index."""
    return {
        "classes": list(dataset.classes),
        "palette": np.asarray(dataset.palette).astype(int).tolist(),
        "num_classes": int(dataset.num_classes),
        "ignore_index": int(dataset.ignore_index),
    }


# MMSegmentation's tools/test.py --aug-test: these ratios of the test scale, each also flipped
AUG_TEST_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def with_aug_test(recipe: Recipe) -> Recipe:
    """``recipe`` with MMSegmentation's ``--aug-test``: multi-scale (:data:`AUG_TEST_RATIOS`) and flip."""
    return recipe.replace(test=dataclasses.replace(recipe.test, scales=AUG_TEST_RATIOS, flip=True))


def num_classes_of(data_cfg) -> int:
    """The class count of a recipe's dataset without reading its images (its registered class list)."""
    return len(dataset_classes(data_cfg))


def without_pretrained(recipe: Recipe) -> Recipe:
    """The recipe with ``model.backbone.pretrained`` cleared.

    Used wherever the weights come from elsewhere (a segcli checkpoint) or do not matter (FLOPs),
    so that the backbone's pretrained file need not exist on this machine.
    """
    cfg = recipe.model.backbone.cfg
    if cfg is None or getattr(cfg, "pretrained", None) is None:
        return recipe
    backbone = Component(recipe.model.backbone.type, dataclasses.replace(cfg, pretrained=None))
    return recipe.replace(model=dataclasses.replace(recipe.model, backbone=backbone))


def build_model(recipe: Recipe | str | Path, num_classes: int | None = None) -> nn.Module:
    """The segmentor of a recipe; ``num_classes`` defaults to ``model.num_classes`` or the dataset's."""
    recipe = as_recipe(recipe)
    if num_classes is None:
        num_classes = recipe.model.num_classes or num_classes_of(recipe.data)
    return build_segmentor(recipe.model, num_classes)


@dataclass
class LoadedModel:
    """A model rebuilt from a checkpoint, with the recipe and dataset metadata it was saved with."""

    model: nn.Module
    recipe: Recipe
    meta: dict
    path: Path


def model_from_payload(payload: dict, source: str, recipe: Recipe | None = None, overrides=()) -> tuple[nn.Module, Recipe]:
    """Build the model of a checkpoint payload (its embedded recipe unless ``recipe``) and load its weights."""
    if recipe is None:
        recipe = recipe_from_dict(apply_overrides(payload["recipe"], list(overrides)),
                                  where=f"{source} (embedded recipe)")
    model = build_model(without_pretrained(recipe), num_classes=payload["meta"]["num_classes"])
    load_model_state(model, payload["model"], source)
    return model, recipe


def load_checkpoint(path: str | Path, recipe: str | Path | None = None, overrides=(),
                    device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuild the model stored in a checkpoint (its embedded recipe unless ``recipe`` is given)."""
    payload = read_checkpoint(path)
    rec = load_recipe(recipe, overrides) if recipe is not None else None
    model, rec = model_from_payload(payload, str(path), rec, overrides)
    model.to(device).eval()
    return LoadedModel(model, rec, payload["meta"], Path(path))
