"""The DeepLabV3+ decoder (Chen et al. 2018; MMSegmentation's ``DepthwiseSeparableASPPHead``).

NRD's main baseline (thesis 3.3.1, table 3.1), run on the same encoder: the ASPP is part of the
ResNet backbone here (``resnet`` with ``aspp: true``), so this head is the decoder only:

1. the stride-4 low-level features -> 1×1 conv + BN + ReLU to ``c1_channels`` (48);
2. the encoder output ``F`` (stride 32, 512 ch) upsampled bilinearly ×8 to stride 4;
3. concatenation, two depthwise-separable 3×3 conv + BN + ReLU layers of ``channels`` (512);
4. dropout and a 1×1 classifier. Scores are upsampled ×4 to the input size.

``in_index`` = (low-level, encoder output). Upsampling is grid-aligned for sizes that are not
multiples of 32 (see :func:`segcli.models.base.upsample_to_input`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...configurable import AnyInt, NonNegativeFloat, PositiveInt, UnitFloat
from ...registry import HEADS
from ..layers import ConvBNReLU, SeparableConvBNReLU
from ..base import HeadContext, LogitHead, check_in_index, upsample_to_input


@dataclass(frozen=True)
class DeepLabV3PlusConfig:
    in_index: tuple[AnyInt, AnyInt] = (0, -1)  # (low-level features, encoder output F)
    c1_channels: PositiveInt = 48
    channels: PositiveInt = 512
    dropout: UnitFloat = 0.1
    loss_weight: NonNegativeFloat = 1.0


class DeepLabV3PlusHead(LogitHead):
    def __init__(self, cfg: DeepLabV3PlusConfig, ctx: HeadContext):
        super().__init__(ctx, cfg.loss_weight)
        self.cfg = cfg
        self.low_index = check_in_index(cfg.in_index[0], ctx, "deeplabv3plus")
        self.high_index = check_in_index(cfg.in_index[1], ctx, "deeplabv3plus")
        self.logit_stride = ctx.in_strides[self.low_index]  # the logits are on the low-level grid
        self.high_ratio = ctx.in_strides[self.high_index] / self.logit_stride
        self.c1_bottleneck = ConvBNReLU(ctx.in_channels[self.low_index], cfg.c1_channels, 1)
        self.sep_bottleneck = nn.Sequential(
            SeparableConvBNReLU(ctx.in_channels[self.high_index] + cfg.c1_channels, cfg.channels, 3),
            SeparableConvBNReLU(cfg.channels, cfg.channels, 3),
        )
        self.build_classifier(cfg.channels, cfg.dropout)

    def forward(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        low = self.c1_bottleneck(features[self.low_index])  # [B, 48, H/4, W/4]
        high = upsample_to_input(features[self.high_index], self.high_ratio, tuple(low.shape[-2:]))  # [B, C, H/4, W/4]
        x = self.sep_bottleneck(torch.cat([high, low], dim=1))  # [B, channels, H/4, W/4]
        return {"logits": self.classify(x)}  # [B, K, H/4, W/4]


@HEADS.register("deeplabv3plus", DeepLabV3PlusConfig)
def build_deeplabv3plus(cfg: DeepLabV3PlusConfig, ctx: HeadContext) -> DeepLabV3PlusHead:
    return DeepLabV3PlusHead(cfg, ctx)
