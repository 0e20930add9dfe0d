"""SETR-naive / SETR-UP head (Zheng et al. 2021; the thesis' "SETR naive" baseline, table 4.x).

As in MMSegmentation's ``SETRUPHead``: LayerNorm on the ViT tokens, then ``num_convs`` times
(conv ``kernel_size`` -> BN -> ReLU -> bilinear upsample ×``up_scale``), dropout, and a 1×1
classifier. SETR-naive is ``num_convs=1, up_scale=4, kernel_size=1``; SETR's auxiliary heads are
the same head with ``num_convs=2`` on earlier blocks. Scores are upsampled bilinearly to the
requested size; the loss is pixel CE at label resolution.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...configurable import AnyInt, NonNegativeFloat, NonNegativeInt, PositiveInt, UnitFloat
from ...registry import HEADS
from ..base import HeadContext, LogitHead, check_in_index


@dataclass(frozen=True)
class SETRConfig:
    in_index: AnyInt = -1
    channels: PositiveInt = 256
    num_convs: NonNegativeInt = 1
    up_scale: PositiveInt = 4
    kernel_size: PositiveInt = 1
    dropout: UnitFloat = 0.0
    loss_weight: NonNegativeFloat = 1.0


class SETRHead(LogitHead):
    logit_stride = None  # scores: a plain bilinear resize of the upsampled logits (MMSegmentation)

    def __init__(self, cfg: SETRConfig, ctx: HeadContext):
        super().__init__(ctx, cfg.loss_weight)
        self.cfg = cfg
        self.in_index = check_in_index(cfg.in_index, ctx, "setr")
        in_channels = ctx.in_channels[self.in_index]
        self.norm = nn.LayerNorm(in_channels, eps=1e-6)
        layers = []
        for i in range(cfg.num_convs):
            layers += [
                nn.Conv2d(in_channels if i == 0 else cfg.channels, cfg.channels, cfg.kernel_size,
                          padding=cfg.kernel_size // 2, bias=False),
                nn.BatchNorm2d(cfg.channels),
                nn.ReLU(inplace=True),
                nn.Upsample(scale_factor=cfg.up_scale, mode="bilinear", align_corners=False),
            ]
        self.convs = nn.Sequential(*layers)
        self.build_classifier(cfg.channels, cfg.dropout, init_std=None)  # PyTorch's default init, as released

    def forward(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        x = features[self.in_index]  # [B, C, h, w]
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # LayerNorm over C
        logits = self.classify(self.convs(x))  # [B, K, h*s, w*s]
        return {"logits": logits}

    def input_layer(self) -> int:
        return self.in_index


@HEADS.register("setr", SETRConfig)
def build_setr(cfg: SETRConfig, ctx: HeadContext) -> SETRHead:
    return SETRHead(cfg, ctx)
