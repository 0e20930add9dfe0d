"""Named models (``--model NAME``): the table of names, the files they are cached as, and where
the released ones come from.

A named model is a segcli checkpoint at ``$SEGCLI_CACHE/<file>`` (default ``~/.cache/segcli/``);
checkpoints embed their recipe, so that file alone is enough, and a file placed there by hand
always wins. The released SegViT models (zbwxp/SegVit README, hosted on the model hub as
``Akide/SegViTv1``) are fetched on first use and converted with their released recipe
(``segcli/workflows/released.py``); the others are trained with ``segcli train``.

:data:`ZOO` is the one table of names, files, recipes and sources. Functions take the table as an
argument (default :data:`ZOO`), so a script or a test passes its own instead of changing this one.
Published figures are not repeated here: ``segcli zoo list`` reads them from each entry's recipe
(its ``published:`` block, which cites the thesis table or README line).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from .download import cache_dir, hub_url
from .errors import SegcliError, did_you_mean

__all__ = ["Released", "ZooEntry", "ZOO", "HUB_REPO", "RECIPES", "lookup", "checkpoint_path", "recipe_path"]

# The shipped recipes, the one place their folder is named: segcli/recipes is a link to the repository's
# top-level recipes/ in a clone, and a copy of it in a wheel (pyproject's package-data).
RECIPES = (Path(__file__).resolve().parent / "recipes").resolve()
HUB_REPO = "Akide/SegViTv1"  # zbwxp/SegVit README: "[ckpt](https://huggingface.co/Akide/SegViTv1)"


@dataclass(frozen=True)
class Released:
    """An official file on the model hub and the released recipe that ``segcli convert`` needs for it."""

    file: str
    recipe: str  # relative to the repository root, or absolute
    repo: str = HUB_REPO
    revision: str | None = None  # None: the repo's main branch

    @property
    def url(self) -> str:
        return hub_url(self.repo, self.file, self.revision)


@dataclass(frozen=True)
class ZooEntry:
    name: str
    file: str  # the segcli checkpoint in the cache
    recipe: str  # the recipe that trains it (relative to the repository root, or absolute)
    description: str
    released: Released | None = None  # where a released model is fetched from; None: train it


def _released(name: str, description: str, hub_file: str, released_recipe: str) -> ZooEntry:
    """A released model: its recipe (which also trains it: the released architecture on its base
    recipe's schedule) is the one that converts the hub file; the cache file is ``<name>.pt``."""
    recipe = f"recipes/released/{released_recipe}"
    return ZooEntry(name, f"{name}.pt", recipe, description, Released(hub_file, recipe))


# The released files: zbwxp/SegVit README, "Model backbone | datasets | mIoU | ... | ckpt" table.
ZOO: Mapping[str, ZooEntry] = MappingProxyType({e.name: e for e in (
    _released("segvit", "SegViT ViT-B/16, ADE20K",
              "ade_51.3.pth", "segvit_vit_b_ade20k.yaml"),
    _released("segvit-l", "SegViT ViT-L/16, ADE20K",
              "ade_54.6.pth", "segvit_vit_l_ade20k.yaml"),
    _released("segvit-l-shrunk", "Shrunk SegViT ViT-L/16, ADE20K",
              "ade_shrunk_53.9.pth", "segvit_shrunk_vit_l_ade20k.yaml"),
    _released("segvit-l-coco-stuff10k", "SegViT ViT-L/16, COCO-Stuff-10K",
              "COCOstuff_49.9.pth", "segvit_vit_l_coco_stuff10k.yaml"),
    _released("segvit-l-shrunk-coco-stuff10k", "Shrunk SegViT ViT-L/16, COCO-Stuff-10K",
              "COCOstuff10k_shrunk_49.1.pth", "segvit_shrunk_vit_l_coco_stuff10k.yaml"),
    _released("segvit-l-pc59", "SegViT ViT-L/16, Pascal Context 59",
              "PC59cls_64.1.pth", "segvit_vit_l_pascal_context.yaml"),
    _released("segvit-l-shrunk-pc59", "Shrunk SegViT ViT-L/16, Pascal Context 59",
              "PC59cls_62.3.pth", "segvit_shrunk_vit_l_pascal_context.yaml"),
    ZooEntry("setr", "setr.pt", "recipes/setr_vit_b_ade20k.yaml", "SETR-naive ViT-B/16, ADE20K"),
    ZooEntry("nrd", "nrd.pt", "recipes/nrd_r50_cityscapes.yaml", "NRD ResNet-50, Cityscapes"),
    ZooEntry("quickstart", "quickstart.pt", "recipes/quickstart.yaml", "quickstart (synthetic data)"),
)})


def lookup(name: str, zoo: Mapping[str, ZooEntry] = ZOO, where: str = "--model") -> ZooEntry:
    """The entry of ``name``; an unknown name is an error naming ``where`` it was given."""
    if name not in zoo:
        raise SegcliError(f"unknown model '{name}'", where, did_you_mean(name, zoo) + "; `segcli zoo list` shows all")
    return zoo[name]


def checkpoint_path(entry: ZooEntry) -> Path:
    """Where the named model's segcli checkpoint is (or will be) cached."""
    return cache_dir() / entry.file


def recipe_path(path: str) -> Path:
    """A table's recipe path: absolute as is, else ``recipes/...`` of the shipped recipes (:data:`RECIPES`)."""
    if Path(path).is_absolute():
        return Path(path)
    parts = Path(path).parts
    return RECIPES.joinpath(*parts[1:]) if parts[:1] == ("recipes",) else RECIPES.parent / path
