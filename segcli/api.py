"""The importable surface of segcli: what the CLI calls, and what notebooks and scripts call.

Every function takes typed inputs, returns values and never prints; long operations report
progress through an optional callback. User errors raise :class:`segcli.errors.SegcliError`.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .engine.checkpoint import load_model_state, read_checkpoint
from .engine.distributed import DistInfo, barrier, cleanup, init_distributed
from .engine.evaluate import evaluate_model
from .engine.flops import count_flops, count_params
from .engine.trainer import TrainResult, run_training
from .errors import SegcliError
from .recipe import Recipe, apply_overrides, load_recipe, recipe_from_dict

__all__ = ["load_recipe", "build_model", "load_checkpoint", "train", "evaluate", "predict", "flops", "prune", "cl_step",
           "LoadedModel", "PredictResult", "pick_device"]

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


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


# --------------------------------------------------------------------------- building


def _as_recipe(recipe: Recipe | str | Path, overrides=()) -> Recipe:
    if isinstance(recipe, Recipe):
        if overrides:
            return recipe_from_dict(apply_overrides(recipe.to_dict(), list(overrides)), where="recipe")
        return recipe
    return load_recipe(recipe, overrides)


def build_datasets(recipe: Recipe, splits=("train", "val")):
    """The recipe's datasets, with the training / evaluation transforms attached."""
    from .data import build_dataset

    return tuple(build_dataset(recipe.data, split) for split in splits)


def dataset_meta(dataset) -> dict:
    return {
        "classes": list(dataset.classes),
        "palette": np.asarray(dataset.palette).astype(int).tolist(),
        "num_classes": int(dataset.num_classes),
        "ignore_index": int(dataset.ignore_index),
    }


def num_classes_of(data_cfg) -> int:
    """The class count of a recipe's dataset without reading its images (FLOPs, model building).

    Known datasets have fixed class lists; ``folder`` reads ``ROOT/classes.txt``; ``data.classes``
    overrides both.
    """
    from .data import SYNTHETIC_CLASSES, classes as known
    from .data.datasets import dataset_root, read_class_file

    if data_cfg.classes:
        return len(data_cfg.classes)
    fixed = {
        "ade20k": known.ADE20K_CLASSES, "cityscapes": known.CITYSCAPES_CLASSES,
        "pascal_context": known.PASCAL_CONTEXT_60_CLASSES, "pascal_context_59": known.PASCAL_CONTEXT_59_CLASSES,
        "coco_stuff10k": known.COCO_STUFF_CLASSES, "synthetic": SYNTHETIC_CLASSES,
    }
    if data_cfg.type in fixed:
        return len(fixed[data_cfg.type])
    return len(read_class_file(dataset_root(data_cfg, "data/my_dataset") / "classes.txt"))


def without_pretrained(recipe: Recipe) -> Recipe:
    """The recipe with ``model.backbone.pretrained`` cleared.

    Used wherever the weights come from elsewhere (a segcli checkpoint) or do not matter (FLOPs),
    so that the backbone's pretrained file need not exist on this machine.
    """
    import dataclasses

    from .configurable import Component

    cfg = recipe.model.backbone.cfg
    if cfg is None or getattr(cfg, "pretrained", None) is None:
        return recipe
    backbone = Component(recipe.model.backbone.type, dataclasses.replace(cfg, pretrained=None))
    return recipe.replace(model=dataclasses.replace(recipe.model, backbone=backbone))


def build_model(recipe: Recipe | str | Path, num_classes: int | None = None) -> nn.Module:
    """The segmentor of a recipe; ``num_classes`` defaults to ``model.num_classes`` or the dataset's."""
    from .models import build_segmentor

    recipe = _as_recipe(recipe)
    if num_classes is None:
        num_classes = recipe.model.num_classes or num_classes_of(recipe.data)
    return build_segmentor(recipe.model, num_classes)


@dataclass
class LoadedModel:
    model: nn.Module
    recipe: Recipe
    meta: dict
    path: Path


def load_checkpoint(path: str | Path, recipe: str | Path | None = None, overrides=(),
                    device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuild the model stored in a checkpoint (its embedded recipe unless ``recipe`` is given)."""
    payload = read_checkpoint(path)
    if recipe is not None:
        rec = load_recipe(recipe, overrides)
    else:
        rec = recipe_from_dict(apply_overrides(payload["recipe"], list(overrides)), where=f"{path} (embedded recipe)")
    meta = payload["meta"]
    model = build_model(without_pretrained(rec), num_classes=meta["num_classes"])
    load_model_state(model, payload["model"], str(path))
    model.to(device).eval()
    return LoadedModel(model, rec, meta, Path(path))


# --------------------------------------------------------------------------- train / eval


def train(recipe: Recipe | str | Path, work_dir: str | Path | None = None, overrides=(), resume: bool = False,
          device: str | None = None, callback=None) -> TrainResult:
    """Train a recipe; writes ``last.pt``, ``best.pt``, ``metrics.jsonl`` and ``recipe.yaml`` to ``work_dir``."""
    from .recipe import dump_recipe

    recipe = _as_recipe(recipe, overrides)
    work_dir = Path(work_dir or Path("runs") / recipe.name)
    dev = pick_device(device)
    dist_info = init_distributed(dev)
    try:
        if not dist_info.is_main:  # rank 0 generates/caches data (e.g. the synthetic set) first
            barrier(dist_info)
        train_set, val_set = build_datasets(recipe)
        if dist_info.is_main:
            barrier(dist_info)
        torch.manual_seed(recipe.train.seed)  # the initial weights depend on the seed alone
        model = build_model(recipe, num_classes=train_set.num_classes)
        if dist_info.is_main:
            work_dir.mkdir(parents=True, exist_ok=True)
            (work_dir / "recipe.yaml").write_text(dump_recipe(recipe))
        return run_training(recipe, model, train_set, val_set, work_dir, dataset_meta(train_set), dev, dist_info,
                            resume=resume, callback=callback)
    finally:
        cleanup(dist_info)


def evaluate(checkpoint: str | Path, recipe: str | Path | None = None, overrides=(), device: str | None = None,
             trimap: int | None = None, flops: bool = False, limit: int | None = None,
             progress: Callable[[int, int], None] | None = None) -> dict:
    """Metrics of a checkpoint on its recipe's validation split (percent), optionally trimap and GFLOPs."""
    dev = pick_device(device)
    loaded = load_checkpoint(checkpoint, recipe, overrides, dev)
    (val_set,) = build_datasets(loaded.recipe, splits=("val",))
    if loaded.meta.get("cl"):  # a continual-learning step: only the classes learnt so far count
        from .continual import cl_eval_dataset

        val_set = cl_eval_dataset(loaded.meta, val_set)
    if val_set.num_classes != loaded.meta["num_classes"]:
        raise SegcliError(f"the dataset has {val_set.num_classes} classes but the checkpoint {loaded.meta['num_classes']}",
                          "data.type", "evaluate on the dataset the model was trained for")
    result = evaluate_model(loaded.model, val_set, loaded.recipe, dev, DistInfo(), trimap=trimap,
                            count_gflops=flops, progress=progress, limit=limit)
    result["checkpoint"] = str(checkpoint)
    if loaded.meta.get("cl"):
        from .continual import cl_metrics

        result["cl"] = cl_metrics(checkpoint, result, loaded.meta, device=dev)
    return result


def prune(checkpoint: str | Path, p0: float = 0.95, k: int = 5, layers: str | tuple[int, ...] | None = None,
          out: str | Path | None = None) -> Path:
    """DToP@Direct (thesis ch. 5): write a pruned copy of a checkpoint that has auxiliary heads."""
    from .pruning import parse_layers, prune_checkpoint

    if isinstance(layers, str):
        layers = parse_layers(layers)
    return prune_checkpoint(checkpoint, p0, k, layers, out)


def cl_step(recipe: Recipe | str | Path | None, task: int, work_dir: str | Path | None = None, overrides=(),
            device: str | None = None, resume: bool = False, callback=None):
    """One SegViT-CL step (thesis 4.2.3): task 1 trains the base model, task N adds and trains a head."""
    from .continual import cl_step as run_step

    return run_step(recipe, task, work_dir, overrides, device=device, resume=resume, callback=callback)


def flops(recipe: Recipe | str | Path, shape: tuple[int, int] | None = None, overrides=()) -> dict:
    """GFLOPs (fvcore, attention counted) and parameters (M) of a recipe's model on one image."""
    recipe = _as_recipe(recipe, overrides)
    model = build_model(without_pretrained(recipe))
    height, width = shape or recipe.data.crop_size
    images = torch.zeros(1, 3, height, width)
    return {"gflops": count_flops(model, images), "params_m": count_params(model), "shape": [height, width]}


# --------------------------------------------------------------------------- predict


@dataclass
class PredictResult:
    written: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files, folders (their images) and globs -> image paths; unknown entries reported."""
    files, failed = [], []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        elif path.is_file():
            files.append(path)
        elif any(ch in item for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not matches:
                failed.append((item, "the pattern matches no file"))
            files += matches
        else:
            failed.append((item, "no such file or folder"))
    unique = list(dict.fromkeys(p.resolve() for p in files))  # a file given twice is segmented once
    return unique, failed


def output_stems(files: list[Path]) -> list[str]:
    """Output names: the file stem; where stems collide, the extension is added (same folder) or
    parent folder names are prefixed (``a/x.jpg``, ``b/x.jpg`` -> ``a_x``, ``b_x``), so that no
    prediction overwrites another."""
    def label(path: Path, depth: int, ext: bool) -> str:
        parts = list(path.parent.parts[len(path.parent.parts) - depth:]) if depth else []
        parts.append(path.stem + (path.suffix.replace(".", "_") if ext else ""))
        return "_".join(part.strip("/\\") or "root" for part in parts)

    state = {path: [0, False] for path in files}  # parents prefixed, extension added
    for _ in range(64):
        names = [label(path, *state[path]) for path in files]
        clashes = {n for n in names if names.count(n) > 1}
        if not clashes:
            return names
        for path, n in zip(files, names):
            if n not in clashes:
                continue
            twin = any(q != path and q.parent == path.parent and q.stem == path.stem for q in files)
            if twin and not state[path][1]:
                state[path][1] = True
            elif state[path][0] < len(path.parent.parts):
                state[path][0] += 1
    return [f"{n}_{i}" for i, n in enumerate(names)]


def predict(inputs: list[str], checkpoint: str | Path, out_dir: str | Path = "predictions", overlay: bool = False,
            device: str | None = None, progress: Callable[[int, int], None] | None = None,
            show_pruning: bool = False) -> PredictResult:
    """Label PNGs (``<stem>.png``, class ids) and colour PNGs (``<stem>_color.png``, or ``_overlay``)."""
    from .data import read_image
    from .engine.inference import infer
    from .viz import colorize, overlay_image, save_png

    dev = pick_device(device)
    loaded = load_checkpoint(checkpoint, device=dev)
    files, failed = expand_inputs(inputs)
    result = PredictResult(failed=list(failed))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    palette = np.asarray(loaded.meta["palette"], dtype=np.uint8)
    mean = torch.tensor(loaded.recipe.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(loaded.recipe.data.std).view(1, 3, 1, 1)
    for i, (path, stem) in enumerate(zip(files, output_stems(files))):
        try:
            image = read_image(path)
        except SegcliError as err:
            result.failed.append((str(path), err.message))
            continue
        tensor = (torch.from_numpy(image).permute(2, 0, 1)[None].float() - mean) / std  # [1, 3, H, W]
        with torch.no_grad():
            scores = infer(loaded.model, tensor.to(dev), loaded.recipe.test, loaded.recipe.data.crop_size)
        pred = scores.argmax(1)[0].cpu().numpy()
        label_dtype = np.uint8 if loaded.meta["num_classes"] <= 255 else np.uint16
        save_png(out / f"{stem}.png", pred.astype(label_dtype))
        result.written.append(out / f"{stem}.png")
        color = colorize(pred, palette)
        save_png(out / f"{stem}_color.png", color[..., ::-1])
        result.written.append(out / f"{stem}_color.png")
        if overlay:
            save_png(out / f"{stem}_overlay.png", overlay_image(image, color)[..., ::-1])
            result.written.append(out / f"{stem}_overlay.png")
        if show_pruning and hasattr(loaded.model, "exit_maps"):
            for stage, exit_map in enumerate(loaded.model.exit_maps(tensor.to(dev))):
                save_png(out / f"{stem}_exit{stage}.png", exit_map)
                result.written.append(out / f"{stem}_exit{stage}.png")
        if progress is not None:
            progress(i + 1, len(files))
    return result
