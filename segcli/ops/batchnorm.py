"""BatchNorm folding for inference (``engine/inference.py`` ``prepare_for_inference``, and the
ResNets' ``fuse_for_inference``): a conv followed by an eval-mode BatchNorm is one conv."""
from __future__ import annotations

import torch
from torch import nn


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold an inference-mode BatchNorm into the convolution it follows, in place:
    ``bn(conv(x)) == conv'(x)`` with ``w' = w * g / s``, ``b' = (b - mean) * g / s + beta``,
    ``s = sqrt(var + eps)``. The BatchNorm must then be skipped (replaced by ``nn.Identity``)."""
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps) if bn.affine else \
        1.0 / torch.sqrt(bn.running_var + bn.eps)  # [C_out]
    shift = bn.bias.detach() if bn.affine else torch.zeros_like(scale)
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(scale)
    with torch.no_grad():
        conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
        conv.bias = nn.Parameter((bias - bn.running_mean) * scale + shift, requires_grad=False)


def foldable_batchnorm(module: nn.Module) -> bool:
    """A plain BatchNorm2d that normalises with running statistics in eval mode (so it can be folded)."""
    return type(module) is nn.BatchNorm2d and module.track_running_stats


def fold_batchnorms(module: nn.Module) -> int:
    """Fold every BatchNorm2d that directly follows a Conv2d inside an ``nn.Sequential`` (the conv
    blocks above; MMSegmentation's and timm's downsample paths) into that convolution; returns
    how many. Decision: only sequences, where the convolution's output provably feeds the
    BatchNorm alone; a module wiring them in ``forward`` folds its own pairs
    (``fuse_for_inference``). For a model in eval mode that will not be trained again."""
    folded = 0
    for parent in list(module.modules()):
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        for first, second in zip(names, names[1:]):
            conv, bn = parent._modules[first], parent._modules[second]
            if isinstance(conv, nn.Conv2d) and foldable_batchnorm(bn):
                fold_batchnorm(conv, bn)
                parent._modules[second] = nn.Identity()
                folded += 1
    return folded
