"""Evaluating a checkpoint on its dataset's validation split (``segcli eval``)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from ..build import build_datasets, load_checkpoint, pick_device, with_aug_test
from ..engine.distributed import DistInfo
from ..engine.evaluate import evaluate_model
from ..data import build_dataset
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
             opacity: float = 0.5, overwrite: bool = False, format_only: str | Path | None = None,
             split: str | None = None) -> dict:
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

    ``format_only``: MMSegmentation ``test.py``'s ``--format-only``: no metrics; each image's predicted
    label map is written to ``<format_only>/<stem>.png`` in the ids the dataset's own masks use (the
    inverse of its label mapping: ADE20K, COCO-Stuff, Pascal Context 59 ``label + 1``; Cityscapes'
    label ids, not train ids; :attr:`~segcli.data.SegDataset.output_lut`), which is what their
    benchmark servers read. The split needs no masks (``split``: the directory or list name of the
    split to read, e.g. Cityscapes ``test``; default the recipe's ``data.val_split``).
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
    if format_only is not None:
        for given, flag in ((confusion, "--confusion"), (trimap, "--trimap"), (flops or None, "--flops")):
            if given is not None:
                raise SegcliError(f"{flag} needs ground truth or metrics, and --format-only computes none", flag,
                                  "run eval without --format-only for it")
    elif split is not None:
        raise SegcliError("--split chooses the images --format-only writes; metrics use the recipe's val split",
                          "--split", "add --format-only DIR, or set data.val_split to evaluate another split")
    dev = pick_device(device)
    loaded = load_checkpoint(checkpoint, recipe, overrides, dev)
    if aug_test:
        loaded.recipe = with_aug_test(loaded.recipe)
    if not flops:  # GFLOPs count the model as built (BatchNorms too), as `segcli flops` does
        prepare_for_inference(loaded.model)
    if compile:
        compile_for_inference(loaded.model, dev)
    if format_only is not None:
        return _format_results(loaded, checkpoint, Path(format_only), split, dev, limit, progress, compile,
                               overwrite, show_dir, opacity)
    (val_set,) = build_datasets(loaded.recipe, splits=("val",))
    val_set = cl_eval_dataset(loaded.meta, val_set)  # unchanged unless a continual-learning step
    if val_set.num_classes != loaded.meta["num_classes"]:
        raise SegcliError(f"the dataset has {val_set.num_classes} classes but the checkpoint {loaded.meta['num_classes']}",
                          "data.type", "evaluate on the dataset the model was trained for")
    count = len(val_set) if limit is None else min(limit, len(val_set))
    shown = _image_paths(val_set, show_dir, count) if show_dir is not None else {}
    data_dirs = val_set.folders()
    check_outputs(list(shown.values()), inputs=[checkpoint], data_dirs=sorted(data_dirs), overwrite=overwrite,
                  option="--show-dir", input_name="checkpoint")
    if confusion is not None:
        check_outputs([confusion], inputs=[checkpoint], data_dirs=sorted(data_dirs), overwrite=overwrite,
                      option="--confusion", suffixes=IMAGE_SUFFIXES, input_name="checkpoint")
    if shown:
        Path(show_dir).mkdir(parents=True, exist_ok=True)
    show = _shower(val_set, loaded.meta, shown, opacity)
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


def _image_paths(dataset, folder, count: int) -> dict[int, Path]:
    """``{index: folder/<stem>.png}`` for the first ``count`` images, named as ``predict`` names its
    outputs (:func:`~segcli.workflows.predict.output_stems`: colliding stems get their folder)."""
    stems = output_stems([Path(image) for image, _ in dataset.samples[:count]])
    return {i: Path(folder) / f"{stem}.png" for i, stem in enumerate(stems)}


def _shower(dataset, meta: dict, shown: dict[int, Path], opacity: float) -> Callable[[int, object], None]:
    """``show(index, labels)``: the prediction over image ``index``, with a key, as ``predict --overlay``
    draws it, to ``shown[index]`` (``--show-dir``)."""
    palette = np.asarray(meta["palette"], dtype=np.uint8)
    classes = list(meta["classes"])

    def show(index: int, labels) -> None:
        image, _ = dataset.read(index)
        pred = labels.cpu().numpy()
        save_png(shown[index], with_legend(overlay_image(image, colorize(pred, palette), opacity), pred, classes,
                                           palette)[..., ::-1])

    return show


def _format_results(loaded, checkpoint, out_dir: Path, split: str | None, dev, limit: int | None, progress,
                    compile: bool, overwrite: bool, show_dir, opacity: float) -> dict:
    """``evaluate(format_only=...)``: label maps in the dataset's own ids for a benchmark server.

    The predictions come from the loop that computes ``eval``'s metrics
    (:func:`~segcli.engine.evaluate.evaluate_model` on the split read without masks), so a written file
    is what ``eval`` scores for that image: the recipe's test settings, ``--aug-test``, ``--compile``.
    Like ``eval``, it runs in one process; the loop itself shards by DDP rank, each rank writing its
    own images' files. The result carries the token fractions a pruning model reports."""
    data_cfg = loaded.recipe.data if split is None else replace(loaded.recipe.data, val_split=split)
    dataset = build_dataset(data_cfg, "val", labelled=False)
    if dataset.num_classes != loaded.meta["num_classes"]:
        raise SegcliError(f"the dataset has {dataset.num_classes} classes but the checkpoint {loaded.meta['num_classes']}",
                          "data.type", "format results on the dataset the model was trained for")
    if limit is not None:
        dataset = dataset.subset(range(min(limit, len(dataset))))
    written = _image_paths(dataset, out_dir, len(dataset))
    shown = _image_paths(dataset, show_dir, len(dataset)) if show_dir is not None else {}
    data_dirs = sorted(dataset.folders())
    check_outputs([*written.values(), *shown.values()], inputs=[checkpoint], data_dirs=data_dirs,
                  overwrite=overwrite, option="--format-only / --show-dir", input_name="checkpoint")
    if len(set(written.values()) & set(shown.values())):
        raise SegcliError("--format-only and --show-dir would write the same files", str(out_dir),
                          "give them different folders")
    out_dir.mkdir(parents=True, exist_ok=True)
    if shown:
        Path(show_dir).mkdir(parents=True, exist_ok=True)
    show = _shower(dataset, loaded.meta, shown, opacity)

    def write(index: int, labels) -> None:
        save_png(written[index], dataset.output_lut[labels.cpu().numpy()])  # class ids -> the dataset's own mask ids
        if shown:
            show(index, labels)

    with compile_failures_reported(compile):  # a compile failure surfaces on the first image
        run = evaluate_model(loaded.model, dataset, loaded.recipe, dev, DistInfo(), progress=progress, on_image=write)
    result = {"format_only": str(out_dir), **run, "split": data_cfg.val_split, "checkpoint": str(checkpoint)}
    if shown:
        result["show_dir"] = str(show_dir)
    return result
