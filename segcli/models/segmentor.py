"""The encoder-decoder meta-architecture: backbone -> decode head (+ auxiliary heads).

``forward(images, labels)`` returns the loss dict when labels are given (so DDP wraps one
forward), otherwise per-class scores at the input size: the full form of ``forward_scores``, the
one scoring entry, which whole/slide inference and test-time augmentation in
``engine/inference.py`` call.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.scores import ScoreMap
from ..registry import SEGMENTORS
from .base import Backbone, DecodeHead
from .exportable import ExportSupport


class EncoderDecoder(nn.Module):
    # the submodules whose forward() inference calls, which `--compile` may wrap (engine/inference.py)
    compilable_parts: tuple[str, ...] = ("backbone", "decode_head")

    def __init__(self, backbone: Backbone, decode_head: DecodeHead, aux_heads: list[DecodeHead] | tuple = ()):
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.aux_heads = nn.ModuleList(aux_heads)

    @property
    def num_classes(self) -> int:
        return self.decode_head.num_classes

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        """The loss dict with ``labels``; without, the scores ``[B, K, H, W]`` (:meth:`forward_scores`
        formed whole: what ONNX export and FLOPs counting trace)."""
        if labels is None:
            return self.forward_scores(images).full()  # [B, K, H, W]
        features = self.backbone(images)
        return self.losses(features, self.decode_head(features), labels)

    def export_support(self) -> ExportSupport:
        """Inference runs the backbone and the decode head (auxiliary heads only train)."""
        return self.backbone.export_support() & self.decode_head.export_support()

    def forward_scores(self, images: torch.Tensor) -> ScoreMap:
        """The segmentor's one scoring entry: the scores at the input size, unformed (``ops/scores.py``)."""
        return self.decode_head.score_map(self.decode_head(self.backbone(images)), tuple(images.shape[-2:]))

    def losses(self, features: list[torch.Tensor], outputs: dict, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        losses = {f"decode.{k}": v for k, v in self.decode_head.loss(outputs, labels).items()}
        for i, head in enumerate(self.aux_heads):
            aux_out = head(features)
            losses.update({f"aux{i}.{k}": v for k, v in head.loss(aux_out, labels).items()})
        return losses


@SEGMENTORS.register("encoder_decoder")
def build_encoder_decoder(cfg, backbone, decode_head, aux_heads):
    return EncoderDecoder(backbone, decode_head, aux_heads)
