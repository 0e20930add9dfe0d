"""Segmenting image files into label and colour PNGs (``segcli predict``).

Inputs are files, folders (their images) and globs; output names are the inputs' stems, made
unique where stems collide (:func:`output_stems`), so no prediction overwrites another.
"""
from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..build import load_checkpoint, pick_device, with_aug_test
from ..data import read_image
from ..data.transforms import eval_view, image_tensor
from ..engine.inference import compile_failures_reported, compile_for_inference, infer_labels, prepare_for_inference
from ..errors import SegcliError
from ..onnx_model import load_onnx
from ..outputs import check_outputs as check_writes
from ..viz import colorize, overlay_image, save_png, with_legend

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class PredictResult:
    written: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    out_dir: Path | None = None

    def to_dict(self) -> dict:
        """The ``predict --json`` object."""
        return {"out": str(self.out_dir), "written": [str(p) for p in self.written],
                "failed": [{"path": path, "reason": reason} for path, reason in self.failed]}


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[tuple[str, str]], dict[Path, str]]:
    """Files, folders (their images, sub-folders included) and globs -> image paths; unknown entries
    reported. The third value names each image found in a sub-folder of a given folder by its
    relative path (``val/frankfurt/x.png`` under ``val`` -> ``frankfurt_x``): Cityscapes keeps its
    images in one folder per city, and the city belongs in the output's name."""
    files, failed, names = [], [], {}
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
            if not found:
                failed.append((item, "no images found in this folder or its sub-folders"))
            for image in found:
                relative = image.relative_to(path)
                if len(relative.parts) > 1:
                    names.setdefault(image.resolve(), "_".join((*relative.parent.parts, image.stem)))
            files += found
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
    return unique, failed, names


def output_stems(files: list[Path], names: dict[Path, str] | None = None) -> list[str]:
    """Output names: the file stem (or its name in ``names``); where names collide, the extension
    is added (same folder) or parent folder names are prefixed (``a/x.jpg``, ``b/x.jpg`` -> ``a_x``,
    ``b_x``), so that no prediction overwrites another."""
    names = names or {}

    def label(path: Path, depth: int, ext: bool) -> str:
        parts = list(path.parent.parts[len(path.parent.parts) - depth:]) if depth else []
        parts.append(names.get(path, path.stem) + (path.suffix.replace(".", "_") if ext else ""))
        return "_".join(part.strip("/\\") or "root" for part in parts)

    state = {path: [0, False] for path in files}  # parents prefixed, extension added
    for _ in range(64):
        labels = [label(path, *state[path]) for path in files]
        clashes = {n for n in labels if labels.count(n) > 1}
        if not clashes:
            return labels
        for path, n in zip(files, labels):
            if n not in clashes:
                continue
            twin = any(q != path and q.parent == path.parent and q.stem == path.stem for q in files)
            if twin and not state[path][1]:
                state[path][1] = True
            elif state[path][0] < len(path.parent.parts):
                state[path][0] += 1
    return [f"{n}_{i}" for i, n in enumerate(labels)]


def planned_outputs(stem: str, out: Path, overlay: bool, exit_stages: int) -> list[Path]:
    """Every file that predicting one image named ``stem`` writes into ``out``."""
    names = [f"{stem}.png", f"{stem}_color.png"] + ([f"{stem}_overlay.png"] if overlay else [])
    return [out / name for name in names + [f"{stem}_exit{stage}.png" for stage in range(exit_stages)]]


def check_outputs(files: list[Path], outputs: list[Path], overwrite: bool) -> None:
    """Refuse, before anything is written, outputs that would replace an input image (never allowed)
    or files of an earlier run (allowed with ``overwrite``): :func:`segcli.outputs.check_outputs`."""
    check_writes(outputs, inputs=files, overwrite=overwrite, input_name="input image")


def predict(inputs: list[str], checkpoint: str | Path, out_dir: str | Path = "predictions", overlay: bool = False,
            device: str | None = None, progress: Callable[[int, int], None] | None = None,
            show_pruning: bool = False, overwrite: bool = False, opacity: float = 0.5,
            compile: bool = False, aug_test: bool = False) -> PredictResult:
    """Label PNGs (``<stem>.png``, class ids) and colour PNGs (``<stem>_color.png``, pixel-aligned with
    the image); with ``overlay``, ``<stem>_overlay.png``: the image blended with the colours at
    ``opacity`` (0 = image only, 1 = colours only), with a legend of the classes present beside it.

    Every output path is known before the first is written: one that is an input image is refused
    (even with ``overwrite``), and files of an earlier run in ``out_dir`` are refused unless
    ``overwrite``, so nothing a user has is lost.
    """
    if not 0.0 <= opacity <= 1.0:
        raise SegcliError(f"opacity must be in [0, 1], got {opacity}", "--opacity", "e.g. 0.5")
    files, failed, names = expand_inputs(inputs)
    if not files:
        what = "; ".join(f"{item}: {reason}" for item, reason in failed) or "no input given"
        raise SegcliError(f"no images found ({what})", None, "give image files, folders of images or globs")
    dev = pick_device(device)
    onnx = Path(checkpoint).suffix.lower() == ".onnx"  # an exported file: onnxruntime (onnx_model.py)
    loaded = load_onnx(checkpoint) if onnx else load_checkpoint(checkpoint, device=dev)
    if aug_test:  # MMSegmentation's --aug-test: multi-scale and flip
        loaded.recipe = with_aug_test(loaded.recipe)
    if compile and onnx:
        raise SegcliError("--compile applies to PyTorch checkpoints, not to an ONNX file", str(checkpoint))
    if not onnx:
        prepare_for_inference(loaded.model)
    if compile:  # torch.compile of backbone and head (engine/inference.py: worth it for many images of one size)
        compile_for_inference(loaded.model, dev)
    out = Path(out_dir)
    result = PredictResult(failed=list(failed), out_dir=out)
    if show_pruning and not hasattr(loaded.model, "exit_maps"):
        raise SegcliError("this model prunes no tokens: --show-pruning has nothing to show", str(checkpoint),
                          "give a DToP checkpoint, e.g. one written by `segcli prune`")
    exit_stages = len(loaded.model.exit_map_keys()) if show_pruning else 0
    stems = output_stems(files, names)
    check_outputs(files, [path for stem in stems for path in planned_outputs(stem, out, overlay, exit_stages)],
                  overwrite)
    out.mkdir(parents=True, exist_ok=True)
    palette = np.asarray(loaded.meta["palette"], dtype=np.uint8)
    for i, (path, stem) in enumerate(zip(files, stems)):
        try:
            image = read_image(path)
        except SegcliError as err:
            result.failed.append((str(path), err.message))
            continue
        tensor = image_tensor(image)  # [1, 3, H, W] uint8: resized and normalised per test view
        data = loaded.recipe.data
        with torch.no_grad():
            with compile_failures_reported(compile):  # a compile failure surfaces on the first image
                labels = infer_labels(loaded.model, tensor.to(dev), loaded.recipe.test, data.crop_size,
                                      mean=data.mean, std=data.std)
        pred = labels[0].cpu().numpy()
        label_dtype = np.uint8 if loaded.meta["num_classes"] <= 255 else np.uint16
        save_png(out / f"{stem}.png", pred.astype(label_dtype))
        result.written.append(out / f"{stem}.png")
        color = colorize(pred, palette)
        save_png(out / f"{stem}_color.png", color[..., ::-1])
        result.written.append(out / f"{stem}_color.png")
        if overlay:
            blended = with_legend(overlay_image(image, color, opacity), pred, list(loaded.meta["classes"]), palette)
            save_png(out / f"{stem}_overlay.png", blended[..., ::-1])
            result.written.append(out / f"{stem}_overlay.png")
        if show_pruning and hasattr(loaded.model, "exit_maps"):
            normalised = eval_view(tensor, tuple(tensor.shape[-2:]), data.mean, data.std)  # [1, 3, H, W] float32
            keys = loaded.model.exit_map_keys()  # per map: {grey level: what it means}
            for stage, (exit_map, key) in enumerate(zip(loaded.model.exit_maps(normalised.to(dev)), keys)):
                levels = sorted(key)
                shown = np.searchsorted(levels, exit_map)  # [H, W] index of each pixel's level in the key
                grey = np.array([[level] * 3 for level in levels], np.uint8)
                keyed = with_legend(np.repeat(exit_map[..., None], 3, axis=2), shown, [key[v] for v in levels], grey)
                save_png(out / f"{stem}_exit{stage}.png", keyed[..., ::-1])
                result.written.append(out / f"{stem}_exit{stage}.png")
        if progress is not None:
            progress(i + 1, len(files))
    return result
