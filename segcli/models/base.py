"""The contracts between backbones, heads and segmentors.

Backbones and heads know nothing of each other beyond tensors and shapes (detectron2's
meta-architecture idea):

* a **backbone** maps images ``[B, 3, H, W]`` to a list of feature maps ``[B, C_i, H/s_i, W/s_i]``
  (``out_channels``/``out_strides`` describe them);
* a **decode head** maps that list to a dict of outputs, computes its own weighted losses from
  them (``loss``) and turns them into per-class scores at a requested size (``seg_logits``);
* a **segmentor** (``segmentor.py``) wires one backbone, one decode head and optional auxiliary
  heads; wrappers (DToP, Shrunk, continual learning) compose it.

Registered builders receive their typed config and a :class:`HeadContext`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import SegcliError


@dataclass(frozen=True)
class HeadContext:
    """What a head builder is told about its surroundings."""

    in_channels: tuple[int, ...]  # channels of every backbone output
    in_strides: tuple[int, ...]  # stride of every backbone output
    num_classes: int
    ignore_index: int = 255


class Backbone(nn.Module):
    """Images -> list of NCHW feature maps. Subclasses set ``out_channels`` and ``out_strides``."""

    out_channels: tuple[int, ...] = ()
    out_strides: tuple[int, ...] = ()

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def layer_id(self, param_name: str) -> int:
        """Depth of a parameter for layer-wise lr decay (0 = embeddings). Default: one layer."""
        return 0

    @property
    def num_layers(self) -> int:
        return 1

    def no_weight_decay_names(self) -> set[str]:
        """Parameter names (relative to the backbone) that take no weight decay."""
        return set()


class DecodeHead(nn.Module):
    """Features -> outputs -> (losses | per-class scores)."""

    num_classes: int

    def forward(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def loss(self, outputs: dict, labels: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover
        """Weighted loss terms; ``labels`` is ``[B, H, W]`` long with ignore = 255."""
        raise NotImplementedError

    def seg_logits(self, outputs: dict, size: tuple[int, int]) -> torch.Tensor:  # pragma: no cover
        """Per-class scores ``[B, K, *size]`` whose argmax is the prediction."""
        raise NotImplementedError


def resize(x: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Bilinear resize without corner alignment (MMSegmentation's convention); no-op if equal."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "nearest":
        return nn.functional.interpolate(x, size=size, mode="nearest")
    return nn.functional.interpolate(x, size=size, mode=mode, align_corners=False)


def upsample_to_input(logits: torch.Tensor, stride: float, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of a stride-``stride`` map ``[B, K, h, w]`` to ``[B, K, *size]``, grid-aligned."""
    size = (int(size[0]), int(size[1]))  # plain ints, also under tracing (fvcore)
    extent = (round(int(logits.shape[-2]) * stride), round(int(logits.shape[-1]) * stride))
    if all(0 <= e - s < stride for e, s in zip(extent, size, strict=True)):
        return resize(logits, extent)[..., : size[0], : size[1]]  # [B, K, *size]
    return resize(logits, size)


def check_in_index(index: int, ctx: HeadContext, head: str) -> int:
    """``index`` as a non-negative position in the backbone outputs, or a :class:`SegcliError`."""
    count = len(ctx.in_channels)
    if not -count <= index < count:
        raise SegcliError(f"in_index {index} is out of range: the backbone has {count} outputs", f"{head} head",
                          f"use 0..{count - 1} (or -1 for the last); the backbone's out_indices choose them")
    return index % count
