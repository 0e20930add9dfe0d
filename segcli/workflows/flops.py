"""GFLOPs and parameters of a recipe's model (``segcli flops``)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..build import as_recipe, build_model, without_pretrained
from ..engine.flops import count_flops, count_params
from ..recipe import Recipe


def flops(recipe: Recipe | str | Path, shape: tuple[int, int] | None = None, overrides=()) -> dict:
    """GFLOPs (fvcore, attention counted) and parameters (M) of a recipe's model on one image."""
    recipe = as_recipe(recipe, overrides)
    model = build_model(without_pretrained(recipe))
    height, width = shape or recipe.data.crop_size
    images = torch.zeros(1, 3, height, width)
    return {"gflops": count_flops(model, images), "params_m": count_params(model), "shape": [height, width]}
