"""Ground-truth overlays of a recipe's dataset (``segcli data show``, MMSegmentation's browse_dataset).

Each sample becomes ``<split>_<stem>.png`` in the output folder: the image blended with the
colours of its mask (ignore pixels keep the image), with a legend of the classes present beside
it, the same rendering as ``predict --overlay`` so both can be compared side by side. Samples
are read as training reads them (the dataset's own label mapping, e.g. ``reduce_zero_label``),
without augmentation. Nothing is written over an existing file unless ``overwrite``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..build import as_recipe
from ..data import IGNORE_INDEX, build_dataset
from ..errors import SegcliError
from ..outputs import check_outputs
from ..recipe import Recipe
from ..viz import colorize, overlay_image, save_png, with_legend


@dataclass
class DataShowResult:
    written: list[Path] = field(default_factory=list)


def show_data(recipe: Recipe | str | Path, out_dir: str | Path, overrides=(), splits: tuple[str, ...] = ("train",),
              limit: int | None = 20, opacity: float = 0.5, overwrite: bool = False,
              progress: Callable[[int, int], None] | None = None) -> DataShowResult:
    """Write ground-truth overlays of the first ``limit`` samples (None = all) of each split."""
    if limit is not None and limit < 1:
        raise SegcliError(f"limit must be >= 1, got {limit}", "--limit")
    if not 0.0 <= opacity <= 1.0:
        raise SegcliError(f"opacity must be in [0, 1], got {opacity}", "--opacity", "e.g. 0.5")
    recipe = as_recipe(recipe, overrides)
    out = Path(out_dir)
    plans = []
    for split in splits:
        dataset = build_dataset(recipe.data, split)
        count = len(dataset) if limit is None else min(limit, len(dataset))
        plans += [(dataset, split, i, out / f"{split}_{Path(dataset.samples[i][0]).stem}.png") for i in range(count)]
    # the dataset's own folders: an overlay written there would be read back as a sample
    data_dirs = {folder for dataset in {id(d): d for d, *_ in plans}.values() for folder in dataset.folders()}
    if recipe.data.root is not None:
        data_dirs.add(Path(recipe.data.root))
    check_outputs([path for *_, path in plans], data_dirs=sorted(data_dirs), overwrite=overwrite)
    for dataset, _, index, _ in plans:  # every mask checked before the first overlay is written
        dataset.check_mask(index)
    out.mkdir(parents=True, exist_ok=True)
    result = DataShowResult()
    for done, (dataset, _, index, path) in enumerate(plans, 1):
        image, label = dataset.read(index)
        palette = np.asarray(dataset.palette, dtype=np.uint8)
        valid = label != IGNORE_INDEX
        blended = np.where(valid[..., None], overlay_image(image, colorize(label, palette), opacity), image)
        shown = np.where(valid, label, 0) if valid.any() else np.zeros_like(label)
        panel = with_legend(blended, shown[valid] if valid.any() else shown, list(dataset.classes), palette)
        save_png(path, panel[..., ::-1])
        result.written.append(path)
        if progress is not None:
            progress(done, len(plans))
    return result
