"""The bilinear decoder (thesis 3.3.1, table 3.1): a 1×1 conv to C classes + bilinear upsampling.

The simplest decoder NRD is compared against, on the same encoder output ``F`` (stride 32).
As in MMSegmentation's ``cls_seg``, dropout (0.1) precedes the classifier.

This module also holds :func:`upsample_to_input`, the score upsampling shared by the ResNet-family
heads (NRD, DeepLabV3+, FCN): a stride-r map of ``ceil(H/r)`` rows covers ``r·ceil(H/r) >= H``
input rows, so for inputs that are not multiples of the stride the scores are upsampled to that
padded extent and cropped, instead of being stretched onto the image (MMSegmentation's plain
resize, which shifts the prediction by up to r−1 pixels at the far edge). When the map is not
in that relation to the size (e.g. scores requested at another resolution) it falls back to a
plain bilinear resize.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...registry import HEADS
from ..base import DecodeHead, HeadContext, check_in_index, resize, upsample_to_input
from ..losses import cross_entropy


@dataclass(frozen=True)
class BilinearConfig:
    in_index: int = -1  # the encoder output F (ASPP)
    dropout: float = 0.1
    loss_weight: float = 1.0


class BilinearHead(DecodeHead):
    def __init__(self, cfg: BilinearConfig, ctx: HeadContext):
        super().__init__()
        self.cfg = cfg
        self.num_classes = ctx.num_classes
        self.ignore_index = ctx.ignore_index
        self.in_index = check_in_index(cfg.in_index, ctx, "bilinear")
        self.stride = ctx.in_strides[self.in_index]
        self.dropout = nn.Dropout2d(cfg.dropout)
        self.classifier = nn.Conv2d(ctx.in_channels[self.in_index], ctx.num_classes, 1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        x = features[self.in_index]  # [B, C, H/32, W/32]
        return {"logits": self.classifier(self.dropout(x))}  # [B, K, H/32, W/32]

    def loss(self, outputs: dict, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.seg_logits(outputs, tuple(labels.shape[-2:]))
        return {"loss_ce": self.cfg.loss_weight * cross_entropy(logits, labels, self.ignore_index)}

    def seg_logits(self, outputs: dict, size: tuple[int, int]) -> torch.Tensor:
        return upsample_to_input(outputs["logits"], self.stride, size)  # [B, K, *size]


@HEADS.register("bilinear", BilinearConfig)
def build_bilinear(cfg: BilinearConfig, ctx: HeadContext) -> BilinearHead:
    return BilinearHead(cfg, ctx)
