"""Evaluating a checkpoint on its dataset's validation split (``segcli eval``)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..build import build_datasets, load_checkpoint, pick_device
from ..engine.distributed import DistInfo
from ..engine.evaluate import evaluate_model
from ..engine.inference import compile_failures_reported, compile_for_inference, prepare_for_inference
from ..errors import SegcliError
from .continual.metrics import cl_metrics
from .continual.task_data import cl_eval_dataset


def evaluate(checkpoint: str | Path, recipe: str | Path | None = None, overrides=(), device: str | None = None,
             trimap: int | None = None, flops: bool = False, limit: int | None = None,
             progress: Callable[[int, int], None] | None = None, compile: bool = False) -> dict:
    """Metrics of a checkpoint on its recipe's validation split (percent), optionally trimap and GFLOPs.

    A continual-learning step's checkpoint is scored on the classes learnt so far and gets a ``cl``
    block (base/new/all mIoU, forgetting; :func:`~segcli.workflows.continual.metrics.cl_metrics`).
    ``compile``: ``torch.compile`` the backbone and head first (:func:`~segcli.engine.inference.compile_for_inference`).
    """
    if compile and flops:
        raise SegcliError("--flops traces the model as built; it cannot trace a compiled one", "--compile",
                          "run --flops and --compile separately")
    if trimap is not None and trimap < 1:
        raise SegcliError(f"trimap width {trimap} is not a band", "--trimap", "give a width in pixels >= 1, e.g. 3")
    if limit is not None and limit < 1:
        raise SegcliError(f"limit {limit} evaluates no image", "--limit", "give N >= 1, or omit it for every image")
    dev = pick_device(device)
    loaded = load_checkpoint(checkpoint, recipe, overrides, dev)
    if not flops:  # GFLOPs count the model as built (BatchNorms too), as `segcli flops` does
        prepare_for_inference(loaded.model)
    if compile:
        compile_for_inference(loaded.model, dev)
    (val_set,) = build_datasets(loaded.recipe, splits=("val",))
    val_set = cl_eval_dataset(loaded.meta, val_set)  # unchanged unless a continual-learning step
    if val_set.num_classes != loaded.meta["num_classes"]:
        raise SegcliError(f"the dataset has {val_set.num_classes} classes but the checkpoint {loaded.meta['num_classes']}",
                          "data.type", "evaluate on the dataset the model was trained for")
    with compile_failures_reported(compile):  # a compile failure surfaces on the first image
        result = evaluate_model(loaded.model, val_set, loaded.recipe, dev, DistInfo(), trimap=trimap,
                                count_gflops=flops, progress=progress, limit=limit)
    result["checkpoint"] = str(checkpoint)
    if loaded.meta.get("cl"):
        result["cl"] = cl_metrics(checkpoint, result, loaded.meta, device=dev)
    return result
