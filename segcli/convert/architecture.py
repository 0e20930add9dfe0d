"""What a model is, read from the shapes of its tensors (segcli's names).

A released checkpoint says what it is without a recipe: the patch embedding's width and the
number of blocks give ViT-B or ViT-L, a learnt query grid gives the Shrunk TPN head, the class
queries give the class count. Both sides of a conversion are read by the same function, in
segcli's names: the checkpoint after its key map, and a recipe's model built on the ``meta``
device (shapes only, no memory). Two architectures that compare equal take the same tensors.

Counted from the official heads (zbwxp/SegVit ``decode_heads/atm_head.py`` ``ATMHead``): ``q`` is
``nn.Embedding(num_classes, dim)`` and ``class_embed`` is ``nn.Linear(dim, num_classes + 1)`` (the
extra row is the no-object class), so the class count is the number of class queries; the Shrunk
``TPNATMHead`` (``decode_heads/tpn_atm_head.py``) adds ``q = nn.Embedding((img_size //
shrink_ratio) ** 2, dim)``, the learnt query grid, and passes ``num_classes`` to its ``atm``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields

import torch

VIT_NAMES = {(192, 12): "ViT-Ti", (384, 12): "ViT-S", (768, 12): "ViT-B", (1024, 24): "ViT-L", (1280, 32): "ViT-H"}
FAMILY_NAMES = {"segvit-v1": "SegViT v1", "segvit-v1-shrunk": "Shrunk SegViT v1", "dtop": "DToP model",
                "other": "model"}


@dataclass(frozen=True)
class Architecture:
    family: str  # segvit-v1 | segvit-v1-shrunk | dtop | other
    embed_dim: int | None = None  # ViT width
    depth: int | None = None  # ViT blocks
    patch_size: int | None = None
    pos_grid: int | None = None  # side of the absolute position-embedding grid (training img_size / patch)
    head_dim: int | None = None  # ATM decoder width D
    head_stages: int | None = None  # ATM stages of the decode head
    head_layers: int | None = None  # decoder layers per stage
    num_classes: int | None = None
    query_grid: int | None = None  # side of the Shrunk TPN's learnt query grid
    aux_heads: int = 0  # DToP exits / auxiliary heads

    def describe(self) -> str:
        """``a Shrunk SegViT v1, ViT-L/16, 640 px, 150 classes``: what a user would call it."""
        parts = []
        if self.embed_dim is not None:
            name = VIT_NAMES.get((self.embed_dim, self.depth))
            patch = f"/{self.patch_size}" if self.patch_size else ""
            parts.append(f"{name}{patch}" if name else f"ViT{patch} of {self.depth} blocks x {self.embed_dim} channels")
        if self.pos_grid and self.patch_size:
            parts.append(f"{self.pos_grid * self.patch_size} px")
        if self.num_classes is not None:
            parts.append(f"{self.num_classes} classes")
        return f"a {FAMILY_NAMES[self.family]}" + (", " + ", ".join(parts) if parts else "")


_BLOCK = re.compile(r"backbone\.vit\.blocks\.(\d+)\.")
_STAGE = re.compile(r"decode_head\.stages\.(\d+)\.")
_LAYER = re.compile(r"decode_head\.stages\.0\.layers\.(\d+)\.")
_AUX = re.compile(r"aux_heads\.(\d+)\.")


def _count(pattern: re.Pattern, keys) -> int | None:
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return len(found) or None


def _grid(tokens: int) -> int | None:
    """The side of a square grid of ``tokens`` position embeddings, with or without a cls slot."""
    for grid_tokens in (tokens - 1, tokens):
        side = math.isqrt(max(grid_tokens, 0))
        if side and side * side == grid_tokens:
            return side
    return None


def architecture_of(state: dict[str, torch.Tensor]) -> Architecture:
    """The architecture of a segcli-named state dict (shapes only: ``meta`` tensors are fine)."""
    keys = set(state)
    if "qu.grid_queries.weight" in keys:
        family = "segvit-v1-shrunk"
    elif "aux_heads.0.class_queries.weight" in keys and "decode_head.class_queries.weight" in keys:
        family = "dtop"
    elif "decode_head.class_queries.weight" in keys:
        family = "segvit-v1"
    else:
        family = "other"
    arch: dict = {"family": family, "aux_heads": _count(_AUX, keys) or 0}
    patch = state.get("backbone.vit.patch_embed.proj.weight")
    if patch is not None:  # [C, 3, P, P]
        arch.update(embed_dim=patch.shape[0], patch_size=patch.shape[-1], depth=_count(_BLOCK, keys))
    pos = state.get("backbone.vit.pos_embed")
    if pos is not None:  # [1, (1 +) G*G, C]
        arch["pos_grid"] = _grid(pos.shape[1])
    queries = state.get("decode_head.class_queries.weight")
    if queries is not None:  # [K, D]
        arch.update(num_classes=queries.shape[0], head_dim=queries.shape[1], head_stages=_count(_STAGE, keys),
                    head_layers=_count(_LAYER, keys))
    elif "decode_head.classifier.weight" in keys:  # [K, C(, 1, 1)]
        arch["num_classes"] = state["decode_head.classifier.weight"].shape[0]
    grid_queries = state.get("qu.grid_queries.weight")
    if grid_queries is not None:  # [G*G, D]
        arch["query_grid"] = _grid(grid_queries.shape[0])
    return Architecture(**arch)


# what each field is read from (segcli names), to name the tensor where two architectures differ
EVIDENCE = {
    "embed_dim": "backbone.vit.patch_embed.proj.weight",
    "patch_size": "backbone.vit.patch_embed.proj.weight",
    "pos_grid": "backbone.vit.pos_embed",
    "head_dim": "decode_head.class_queries.weight",
    "num_classes": "decode_head.class_queries.weight",
    "query_grid": "qu.grid_queries.weight",
}
# the tensor that only each family has (segcli names)
FAMILY_MARKERS = {"segvit-v1-shrunk": "qu.grid_queries.weight", "dtop": "aux_heads.0.class_queries.weight",
                  "segvit-v1": "decode_head.class_queries.weight"}
COUNTED = {"depth": ("ViT blocks", "backbone.vit.blocks.*"), "head_stages": ("ATM stages", "decode_head.stages.*"),
           "head_layers": ("decoder layers a stage", "decode_head.stages.0.layers.*"),
           "aux_heads": ("auxiliary heads / exits", "aux_heads.*")}


def first_difference(ours: Architecture, theirs: Architecture, ours_state: dict[str, torch.Tensor],
                     theirs_state: dict[str, torch.Tensor], origins: dict[str, str] | None = None) -> str | None:
    """One phrase naming the first way ``ours`` (the checkpoint's) differs from ``theirs`` (the
    recipe's): the tensor in the checkpoint's own names (``origins``: segcli key -> source key)
    and both shapes, or both counts; None when they are the same."""
    origins = origins or {}

    def shown(key: str, state: dict[str, torch.Tensor], names: dict[str, str]) -> str:
        return f"{names.get(key, key)} {tuple(state[key].shape)}" if key in state else key

    if ours.family != theirs.family:
        mine, recipe = FAMILY_MARKERS.get(ours.family), FAMILY_MARKERS.get(theirs.family)
        mine = f" ({shown(mine, ours_state, origins)})" if mine else ""
        recipe = f" ({shown(recipe, theirs_state, {})})" if recipe else ""
        return (f"the file is a {FAMILY_NAMES[ours.family]}{mine}, "
                f"the recipe builds a {FAMILY_NAMES[theirs.family]}{recipe}")
    for field in fields(Architecture):
        name = field.name
        mine, recipe = getattr(ours, name), getattr(theirs, name)
        if mine == recipe:
            continue
        if name in COUNTED:
            what, pattern = COUNTED[name]
            return f"{what} ({pattern}): {mine} in the file, {recipe} in the recipe"
        key = EVIDENCE[name]
        return f"{shown(key, ours_state, origins)} in the file, {shown(key, theirs_state, {})} in the recipe"
    return None
