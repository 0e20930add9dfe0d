"""Loss functions (criteria live here, not inside heads).

``cross_entropy``: pixel-wise CE with ignore index, used by SETR/FCN/NRD/bilinear heads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Mean CE over non-ignored pixels; ``logits`` [B, K, H, W] (upsampled to ``labels`` [B, H, W]).

    Returns 0 (with a graph) when every pixel is ignored, instead of NaN.
    """
    if logits.shape[-2:] != labels.shape[-2:]:
        # NCHW first: ATen's channels-last bilinear upsampling is many times slower on CPU
        logits = F.interpolate(logits.contiguous(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    valid = labels != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index)
