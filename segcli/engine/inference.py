"""Whole-image and sliding-window inference, with multi-scale + flip test-time augmentation.

The model is any ``nn.Module`` whose ``forward(images)`` returns per-class scores at the input
size. Inputs are padded to the backbone's ``size_divisor`` (16 for ViTs, 32 for ResNets) and the
scores cropped back, so any image size works. ``slide`` follows MMSegmentation: windows of
``crop`` every ``stride``, the last window flush with the border, overlapping scores averaged.
TTA averages the scores of every (scale, flip) after resizing them to the original size.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..models.base import resize


def _size_divisor(model) -> int:
    core = getattr(model, "module", model)
    backbone = getattr(core, "backbone", None)
    return int(getattr(backbone, "size_divisor", 32) or 1)


def forward_padded(model, images: torch.Tensor) -> torch.Tensor:
    """Scores [B, K, H, W] for images of any size (zero-padded to the size divisor)."""
    div = _size_divisor(model)
    height, width = images.shape[-2:]
    pad_h, pad_w = (-height) % div, (-width) % div
    if pad_h or pad_w:
        images = F.pad(images, (0, pad_w, 0, pad_h))
    scores = model(images)
    return scores[..., :height, :width]


def slide_inference(model, images: torch.Tensor, crop: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    batch, _, height, width = images.shape
    crop_h, crop_w = crop
    stride_h, stride_w = stride
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    total = None
    count = images.new_zeros(batch, 1, height, width)
    for r in range(rows):
        for c in range(cols):
            y1, x1 = r * stride_h, c * stride_w
            y2, x2 = min(y1 + crop_h, height), min(x1 + crop_w, width)
            y1, x1 = max(y2 - crop_h, 0), max(x2 - crop_w, 0)
            scores = forward_padded(model, images[:, :, y1:y2, x1:x2])  # [B, K, h, w]
            if total is None:
                total = images.new_zeros(batch, scores.shape[1], height, width)
            total[:, :, y1:y2, x1:x2] += scores
            count[:, :, y1:y2, x1:x2] += 1
    return total / count


def infer(model, images: torch.Tensor, test_cfg, default_crop: tuple[int, int]) -> torch.Tensor:
    """Scores [B, K, H, W] at the size of ``images`` under ``test_cfg`` (mode, scales, flip)."""
    height, width = images.shape[-2:]
    crop = tuple(test_cfg.crop_size or default_crop)
    stride = tuple(test_cfg.stride or (max(1, crop[0] * 2 // 3), max(1, crop[1] * 2 // 3)))
    base_h, base_w = height, width
    if test_cfg.scale is not None:  # fit (long, short) keeping the aspect ratio
        long_side, short_side = max(test_cfg.scale), min(test_cfg.scale)
        ratio = min(long_side / max(height, width), short_side / min(height, width))
        base_h, base_w = int(height * ratio + 0.5), int(width * ratio + 0.5)
    merged = None
    for scale in test_cfg.scales:
        size = (max(1, math.floor(base_h * scale + 0.5)), max(1, math.floor(base_w * scale + 0.5)))
        scaled = resize(images, size)
        for flip in ((False, True) if test_cfg.flip else (False,)):
            x = scaled.flip(-1) if flip else scaled
            if test_cfg.mode == "slide":
                scores = slide_inference(model, x, crop, stride)
            else:
                scores = forward_padded(model, x)
            if flip:
                scores = scores.flip(-1)
            scores = resize(scores.float(), (height, width))
            merged = scores if merged is None else merged + scores
    return merged / (len(test_cfg.scales) * (2 if test_cfg.flip else 1))
