"""GFLOPs and parameters of a recipe's model, or of a checkpoint's (``segcli flops``)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..build import as_recipe, build_model, model_from_payload, without_pretrained
from ..engine.checkpoint import is_checkpoint_file, read_checkpoint
from ..engine.flops import count_flops, count_params
from ..errors import SegcliError
from ..recipe import Recipe


def flops(recipe: Recipe | str | Path, shape: tuple[int, int] | None = None, overrides=()) -> dict:
    """GFLOPs (fvcore, attention counted) and parameters (M) of a model on one image.

    ``recipe`` is a recipe or a segcli checkpoint: a checkpoint is counted with its embedded
    recipe and its weights (a pruned DToP model's exits depend on them), so ``segcli flops
    runs/x/pruned.pt`` counts what ``prune`` wrote.
    """
    if shape is not None and (len(shape) != 2 or min(shape) < 1):
        raise SegcliError(f"shape {tuple(shape)} is not an image size", "--shape", "give H W >= 1, e.g. --shape 512 512")
    if not isinstance(recipe, Recipe) and is_checkpoint_file(recipe):
        model, recipe = model_from_payload(read_checkpoint(recipe), str(recipe), overrides=overrides)
    else:
        recipe = as_recipe(recipe, overrides)
        model = build_model(without_pretrained(recipe))
    height, width = shape or recipe.data.crop_size
    images = torch.zeros(1, 3, height, width)
    return {"gflops": count_flops(model, images), "params_m": count_params(model), "shape": [height, width]}
