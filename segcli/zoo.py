"""Named models for ``segcli predict --model NAME``: name -> checkpoint file in the cache dir.

segcli never downloads: a named model is a checkpoint you trained (or were given) placed at
``$SEGCLI_CACHE/<file>`` (default ``~/.cache/segcli/``). Checkpoints embed their recipe, so the
file alone is enough. The table is the one source of truth for names, files and how to get them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import SegcliError, did_you_mean


@dataclass(frozen=True)
class ZooEntry:
    name: str
    file: str
    recipe: str  # the recipe that trains it
    description: str
    released: str | None = None  # the official file that `segcli convert` turns into it, and the recipe it needs


ZOO: dict[str, ZooEntry] = {e.name: e for e in (
    ZooEntry("segvit", "segvit.pt", "recipes/segvit_vit_b_ade20k.yaml", "SegViT (ATM decoder), ViT-B, ADE20K",
             "ade_51.3.pth (zbwxp/SegVit README) --recipe recipes/released/segvit_vit_b_ade20k.yaml"),
    ZooEntry("segvit-l", "segvit-l.pt", "recipes/segvit_vit_l_ade20k.yaml", "SegViT (ATM decoder), ViT-L, ADE20K",
             "ade_54.6.pth (zbwxp/SegVit README) --recipe recipes/released/segvit_vit_l_ade20k.yaml"),
    ZooEntry("setr", "setr.pt", "recipes/setr_vit_b_ade20k.yaml", "SETR-naive, ViT-B, ADE20K"),
    ZooEntry("nrd", "nrd.pt", "recipes/nrd_r50_cityscapes.yaml", "NRD, ResNet-50, Cityscapes"),
    ZooEntry("quickstart", "quickstart.pt", "recipes/quickstart.yaml", "the quickstart model (synthetic data)"),
)}


def cache_dir() -> Path:
    return Path(os.environ.get("SEGCLI_CACHE", "~/.cache/segcli")).expanduser()


def resolve(name: str) -> Path:
    """The checkpoint path of a named model; a clear error if unknown or not there yet."""
    if name not in ZOO:
        raise SegcliError(f"unknown model '{name}'", "--model", did_you_mean(name, ZOO))
    entry = ZOO[name]
    path = cache_dir() / entry.file
    if not path.is_file():
        if entry.released:
            file, _, recipe = entry.released.partition(" --recipe ")
            hint = (f"convert the released weights: download {file}, then `segcli convert "
                    f"{file.split()[0]} --recipe {recipe} --out {path}` (or pass --checkpoint FILE)")
        else:
            hint = (f"train it: `segcli train {entry.recipe}` then copy runs/<name>/best.pt to {path} "
                    f"(or pass --checkpoint FILE)")
        raise SegcliError(f"model '{name}' ({entry.description}) has no checkpoint at {path}", "--model", hint)
    return path
