"""The DeepLabV3+ decoder (Chen et al. 2018; MMSegmentation's ``DepthwiseSeparableASPPHead``).

NRD's main baseline (thesis 3.3.1, table 3.1: 76.4 decoder GFLOPs vs NRD's 20.4), run on the same
encoder: the ASPP is part of the ResNet backbone here (``resnet`` with ``aspp: true``), so this
head is the decoder only:

1. the stride-4 low-level features -> 1×1 conv + BN + ReLU to ``c1_channels`` (48);
2. the encoder output ``F`` (stride 32, 512 ch) upsampled bilinearly ×8 to stride 4;
3. concatenation, two depthwise-separable 3×3 conv + BN + ReLU layers of ``channels`` (512);
4. dropout and a 1×1 classifier. Scores are upsampled ×4 to the input size.

``in_index`` = (low-level, encoder output). Upsampling is grid-aligned for sizes that are not
multiples of 32 (see :func:`bilinear.upsample_to_input`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...registry import HEADS
from ..layers import ConvBNReLU, SeparableConvBNReLU
from ..base import DecodeHead, HeadContext, check_in_index, upsample_to_input
from ..losses import cross_entropy


@dataclass(frozen=True)
class DeepLabV3PlusConfig:
    in_index: tuple[int, int] = (0, -1)  # (low-level features, encoder output F)
    c1_channels: int = 48
    channels: int = 512
    dropout: float = 0.1
    loss_weight: float = 1.0


class DeepLabV3PlusHead(DecodeHead):
    def __init__(self, cfg: DeepLabV3PlusConfig, ctx: HeadContext):
        super().__init__()
        self.cfg = cfg
        self.num_classes = ctx.num_classes
        self.ignore_index = ctx.ignore_index
        self.low_index = check_in_index(cfg.in_index[0], ctx, "deeplabv3plus")
        self.high_index = check_in_index(cfg.in_index[1], ctx, "deeplabv3plus")
        self.low_stride = ctx.in_strides[self.low_index]
        self.high_ratio = ctx.in_strides[self.high_index] / self.low_stride
        self.c1_bottleneck = ConvBNReLU(ctx.in_channels[self.low_index], cfg.c1_channels, 1)
        self.sep_bottleneck = nn.Sequential(
            SeparableConvBNReLU(ctx.in_channels[self.high_index] + cfg.c1_channels, cfg.channels, 3),
            SeparableConvBNReLU(cfg.channels, cfg.channels, 3),
        )
        self.dropout = nn.Dropout2d(cfg.dropout)
        self.classifier = nn.Conv2d(cfg.channels, ctx.num_classes, 1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        low = self.c1_bottleneck(features[self.low_index])  # [B, 48, H/4, W/4]
        high = upsample_to_input(features[self.high_index], self.high_ratio, tuple(low.shape[-2:]))  # [B, C, H/4, W/4]
        x = self.sep_bottleneck(torch.cat([high, low], dim=1))  # [B, channels, H/4, W/4]
        return {"logits": self.classifier(self.dropout(x))}  # [B, K, H/4, W/4]

    def loss(self, outputs: dict, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.seg_logits(outputs, tuple(labels.shape[-2:]))
        return {"loss_ce": self.cfg.loss_weight * cross_entropy(logits, labels, self.ignore_index)}

    def seg_logits(self, outputs: dict, size: tuple[int, int]) -> torch.Tensor:
        return upsample_to_input(outputs["logits"], self.low_stride, size)  # [B, K, *size]


@HEADS.register("deeplabv3plus", DeepLabV3PlusConfig)
def build_deeplabv3plus(cfg: DeepLabV3PlusConfig, ctx: HeadContext) -> DeepLabV3PlusHead:
    return DeepLabV3PlusHead(cfg, ctx)
