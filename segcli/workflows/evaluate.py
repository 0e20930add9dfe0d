"""Evaluating a checkpoint on its dataset's validation split (``segcli eval``)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..build import build_datasets, load_checkpoint, pick_device, with_aug_test
from ..engine.distributed import DistInfo
from ..engine.evaluate import evaluate_model
from ..engine.inference import compile_failures_reported, compile_for_inference, prepare_for_inference
from ..errors import SegcliError
from ..outputs import IMAGE_SUFFIXES, check_outputs
from ..viz import colorize, confusion_image, overlay_image, save_png, with_legend
from .continual.metrics import cl_metrics
from .continual.task_data import cl_eval_dataset
from .predict import output_stems


def evaluate(checkpoint: str | Path, recipe: str | Path | None = None, overrides=(), device: str | None = None,
             trimap: int | None = None, flops: bool = False, limit: int | None = None,
             progress: Callable[[int, int], None] | None = None, compile: bool = False,
             aug_test: bool = False, show_dir: str | Path | None = None, confusion: str | Path | None = None,
             opacity: float = 0.5, overwrite: bool = False) -> dict:
    """Metrics of a checkpoint on its recipe's validation split (percent), optionally trimap and GFLOPs.

    A continual-learning step's checkpoint is scored on the classes learnt so far and gets a ``cl``
    block (base/new/all mIoU, forgetting; :func:`~segcli.workflows.continual.metrics.cl_metrics`).
    ``compile``: ``torch.compile`` the backbone and head first (:func:`~segcli.engine.inference.compile_for_inference`).
    ``aug_test``: MMSegmentation's ``--aug-test`` (:func:`~segcli.build.with_aug_test`). ``show_dir``:
    ``<stem>.png`` per image, the prediction over the image with a key of its classes (as
    MMSegmentation's ``--show-dir``); ``confusion``: a PNG of the row-normalised confusion matrix
    (:func:`~segcli.viz.confusion_image`). Both are checked against the output rule
    (:mod:`segcli.outputs`: never inside the dataset, never over a file without ``overwrite``)
    before the first image is run.
    """
    if compile and flops:
        raise SegcliError("--flops traces the model as built; it cannot trace a compiled one", "--compile",
                          "run --flops and --compile separately")
    if trimap is not None and trimap < 1:
        raise SegcliError(f"trimap width {trimap} is not a band", "--trimap", "give a width in pixels >= 1, e.g. 3")
    if limit is not None and limit < 1:
        raise SegcliError(f"limit {limit} evaluates no image", "--limit", "give N >= 1, or omit it for every image")
    if not 0.0 <= opacity <= 1.0:
        raise SegcliError(f"opacity must be in [0, 1], got {opacity}", "--opacity", "e.g. 0.5")
    dev = pick_device(device)
    loaded = load_checkpoint(checkpoint, recipe, overrides, dev)
    if aug_test:
        loaded.recipe = with_aug_test(loaded.recipe)
    if not flops:  # GFLOPs count the model as built (BatchNorms too), as `segcli flops` does
        prepare_for_inference(loaded.model)
    if compile:
        compile_for_inference(loaded.model, dev)
    (val_set,) = build_datasets(loaded.recipe, splits=("val",))
    val_set = cl_eval_dataset(loaded.meta, val_set)  # unchanged unless a continual-learning step
    if val_set.num_classes != loaded.meta["num_classes"]:
        raise SegcliError(f"the dataset has {val_set.num_classes} classes but the checkpoint {loaded.meta['num_classes']}",
                          "data.type", "evaluate on the dataset the model was trained for")
    count = len(val_set) if limit is None else min(limit, len(val_set))
    images = [Path(image) for image, _ in val_set.samples[:count]]
    shown = {}
    if show_dir is not None:
        shown = {i: Path(show_dir) / f"{stem}.png" for i, stem in enumerate(output_stems(images))}
    data_dirs = val_set.folders()
    check_outputs(list(shown.values()), inputs=[checkpoint], data_dirs=sorted(data_dirs), overwrite=overwrite,
                  option="--show-dir", input_name="checkpoint")
    if confusion is not None:
        check_outputs([confusion], inputs=[checkpoint], data_dirs=sorted(data_dirs), overwrite=overwrite,
                      option="--confusion", suffixes=IMAGE_SUFFIXES, input_name="checkpoint")
    palette = np.asarray(loaded.meta["palette"], dtype=np.uint8)
    classes = list(loaded.meta["classes"])

    def show(index: int, labels) -> None:  # the prediction over the image, as predict --overlay draws it
        image, _ = val_set.read(index)
        pred = labels.cpu().numpy()
        save_png(shown[index], with_legend(overlay_image(image, colorize(pred, palette), opacity), pred, classes,
                                           palette)[..., ::-1])

    if shown:
        Path(show_dir).mkdir(parents=True, exist_ok=True)
    with compile_failures_reported(compile):  # a compile failure surfaces on the first image
        result = evaluate_model(loaded.model, val_set, loaded.recipe, dev, DistInfo(), trimap=trimap,
                                count_gflops=flops, progress=progress, limit=limit,
                                on_image=show if shown else None, keep_confusion=confusion is not None)
    if confusion is not None:
        Path(confusion).parent.mkdir(parents=True, exist_ok=True)
        save_png(confusion, confusion_image(np.asarray(result.pop("confusion")), val_set.classes)[..., ::-1])
        result["confusion_png"] = str(confusion)
    if shown:
        result["show_dir"] = str(show_dir)
    result["checkpoint"] = str(checkpoint)
    if loaded.meta.get("cl"):
        result["cl"] = cl_metrics(checkpoint, result, loaded.meta, device=dev)
    return result
