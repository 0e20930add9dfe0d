"""FCN head (Long et al. 2015; MMSegmentation's ``FCNHead``), mostly used as an auxiliary head.

``num_convs`` 3×3 conv + BN + ReLU layers (``in -> channels -> channels ...``; with 0 convs the
input passes through and ``channels`` is the input width), optionally a ``concat_input`` conv over
``[input, convs(input)]``, then dropout and a 1×1 classifier. The authors' NRD configs attach it
to ResNet stage 3 ("res4", stride 16) with ``channels=256, num_convs=1, concat_input=False,
loss_weight=0.4``; it works the same on ViT maps (``in_index`` picks the block output).

Decision: ``concat_input`` defaults to False (MMSegmentation's default is True, but every use in
the thesis' released configs turns it off).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...configurable import AnyInt, NonNegativeFloat, NonNegativeInt, PositiveInt, UnitFloat
from ...registry import HEADS
from ..layers import ConvBNReLU
from ..base import HeadContext, LogitHead, check_in_index


@dataclass(frozen=True)
class FCNConfig:
    in_index: AnyInt = -1
    channels: PositiveInt = 256
    num_convs: NonNegativeInt = 1
    kernel_size: PositiveInt = 3
    dilation: PositiveInt = 1
    concat_input: bool = False
    dropout: UnitFloat = 0.1
    loss_weight: NonNegativeFloat = 1.0

    def __post_init__(self):
        if self.num_convs < 0:
            raise ValueError("num_convs must be >= 0")
        if self.kernel_size % 2 == 0:
            raise ValueError("kernel_size must be odd")


class FCNHead(LogitHead):
    def __init__(self, cfg: FCNConfig, ctx: HeadContext):
        super().__init__(ctx, cfg.loss_weight)
        self.cfg = cfg
        self.in_index = check_in_index(cfg.in_index, ctx, "fcn")
        self.logit_stride = ctx.in_strides[self.in_index]
        in_channels = ctx.in_channels[self.in_index]
        channels = cfg.channels if cfg.num_convs > 0 else in_channels
        self.convs = nn.Sequential(*(
            ConvBNReLU(in_channels if i == 0 else channels, channels, cfg.kernel_size, dilation=cfg.dilation)
            for i in range(cfg.num_convs)))
        self.conv_cat = ConvBNReLU(in_channels + channels, channels, cfg.kernel_size) if cfg.concat_input else None
        self.build_classifier(channels, cfg.dropout)

    def forward(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        x = features[self.in_index]  # [B, C_in, h, w]
        out = self.convs(x)  # [B, channels, h, w]
        if self.conv_cat is not None:
            out = self.conv_cat(torch.cat([x, out], dim=1))  # [B, channels, h, w]
        return {"logits": self.classify(out)}  # [B, K, h, w]

    def input_layer(self) -> int:
        return self.in_index

    @property
    def supports_token_input(self) -> bool:
        """Per-token only when every conv is 1×1 (or there is none)."""
        return self.cfg.num_convs == 0 or self.cfg.kernel_size == 1


@HEADS.register("fcn", FCNConfig)
def build_fcn(cfg: FCNConfig, ctx: HeadContext) -> FCNHead:
    return FCNHead(cfg, ctx)
