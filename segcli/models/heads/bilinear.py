"""The bilinear decoder (thesis 3.3.1, table 3.1): a 1×1 conv to C classes + bilinear upsampling.

The simplest decoder NRD is compared against, on the same encoder output ``F`` (stride 32).
As in MMSegmentation's ``cls_seg``, dropout (0.1) precedes the classifier.

Its scores use :func:`segcli.models.base.upsample_to_input`, the score upsampling shared by the
ResNet-family heads (NRD, DeepLabV3+, FCN, bilinear): a stride-r map of ``ceil(H/r)`` rows covers ``r·ceil(H/r) >= H``
input rows, so for inputs that are not multiples of the stride the scores are upsampled to that
padded extent and cropped, instead of being stretched onto the image (MMSegmentation's plain
resize, which shifts the prediction by up to r−1 pixels at the far edge). When the map is not
in that relation to the size (e.g. scores requested at another resolution) it falls back to a
plain bilinear resize.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...configurable import AnyInt, NonNegativeFloat, UnitFloat
from ...registry import HEADS
from ..base import HeadContext, LogitHead, check_in_index


@dataclass(frozen=True)
class BilinearConfig:
    in_index: AnyInt = -1  # the encoder output F (ASPP)
    dropout: UnitFloat = 0.1
    loss_weight: NonNegativeFloat = 1.0


class BilinearHead(LogitHead):
    def __init__(self, cfg: BilinearConfig, ctx: HeadContext):
        super().__init__(ctx, cfg.loss_weight)
        self.cfg = cfg
        self.in_index = check_in_index(cfg.in_index, ctx, "bilinear")
        self.logit_stride = ctx.in_strides[self.in_index]
        self.build_classifier(ctx.in_channels[self.in_index], cfg.dropout)

    def forward(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        x = features[self.in_index]  # [B, C, H/32, W/32]
        return {"logits": self.classify(x)}  # [B, K, H/32, W/32]

    def input_layer(self) -> int:
        return self.in_index

    @property
    def supports_token_input(self) -> bool:
        return True  # a 1×1 classifier: per token


@HEADS.register("bilinear", BilinearConfig)
def build_bilinear(cfg: BilinearConfig, ctx: HeadContext) -> BilinearHead:
    return BilinearHead(cfg, ctx)
