"""EQD's edge branch: a token-level edge classifier, its targets and its loss (thesis 4.2.2, eq. 4.6).

Edged query downsampling keeps, besides the 2x2 subsample, every token that "contains an edge".
Edges are predicted by a lightweight MLP running in parallel to the encoder on the patch
embeddings, and trained against targets computed from the ground-truth labels.

* :class:`EdgeHead` -- ``Linear(C, C) -> ReLU -> Linear(C, C/2) -> ReLU -> Linear(C/2, 2)`` on each
  token ``[B, N, C] -> [B, N, 2]``; softmax over the two outputs, index 1 = "edge". The thesis
  names three weight matrices W1, W2, W3 for "three layers with dimensions C, C/2 and 2", so we
  read the widths as the *outputs* of three linear layers; ``hidden=(C/2,)`` gives the two-layer
  reading (C -> C/2 -> 2). The activation is not given: ReLU, as in the authors' MLP helper.
  Weights are truncated-normal (std 0.02) with zero bias, so at initialisation every token sits at
  p(edge) ~ 0.5 and nothing passes the 0.7 threshold until the branch has learnt something.
* :func:`edge_targets` -- eq. 4.6 tokenises the labels into P x P patches and marks a patch that
  holds an edge pixel. "Edge" follows the thesis' own gloss (EQD keeps "tokens containing
  multiple categories"): a patch is an edge token iff its non-ignored pixels hold at least two
  different classes. Ignore pixels are not a class, so a boundary between a class and ignore is
  no edge, and a patch with no valid pixel gets the ignore target. Computed with max/min pooling
  (no loops), exact for label values < 2^24.
* :func:`edge_loss` -- the thesis' cross-entropy between the predicted edge map and the target
  (two-way softmax CE, i.e. BCE on the logit difference), mean over non-ignored tokens, times
  ``weight``; zero (and differentiable) when every target is ignored.

Not a registered decode head: it does not read the backbone's feature list or produce class
scores; :mod:`segcli.models.shrunk` owns it and adds its loss as ``edge.loss_edge``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class EdgeHead(nn.Module):
    """Per-token edge classifier: tokens ``[B, N, C]`` -> logits ``[B, N, 2]`` (index 1 = edge)."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...] | None = None):
        super().__init__()
        widths = (in_dim, *(hidden if hidden is not None else (in_dim, in_dim // 2)), 2)
        layers: list[nn.Module] = []
        for i, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(width_in, width_out))
            if i < len(widths) - 2:
                layers.append(nn.ReLU(inplace=True))
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(tokens)  # [B, N, 2]

    @staticmethod
    def edge_probability(logits: torch.Tensor) -> torch.Tensor:
        """p(edge) ``[B, N]`` from logits ``[B, N, 2]``."""
        return logits.softmax(dim=-1)[..., 1]


def edge_targets(labels: torch.Tensor, patch_size: int, grid: tuple[int, int], ignore_index: int = 255) -> torch.Tensor:
    """Per-patch targets ``[B, h, w]`` (long: 1 edge, 0 not, ``ignore_index`` no valid pixel) from labels ``[B, H, W]``.

    The labels are cropped or padded (with ignore) to ``grid * patch_size`` so that patch (i, j)
    covers the pixels token (i, j) saw (the patch embedding drops remainder rows/columns too).
    """
    height, width = grid[0] * patch_size, grid[1] * patch_size
    labels = labels[:, :height, :width]
    pad_h, pad_w = height - labels.shape[1], width - labels.shape[2]
    if pad_h or pad_w:
        labels = F.pad(labels, (0, pad_w, 0, pad_h), value=ignore_index)
    valid = (labels != ignore_index)[:, None].float()  # [B, 1, H, W]
    values = labels[:, None].float()  # [B, 1, H, W]
    high = F.max_pool2d(torch.where(valid > 0, values, torch.full_like(values, -1.0)), patch_size)  # [B, 1, h, w]
    low = -F.max_pool2d(torch.where(valid > 0, -values, torch.full_like(values, -1e9)), patch_size)  # [B, 1, h, w]
    any_valid = F.max_pool2d(valid, patch_size) > 0  # [B, 1, h, w]
    target = (high != low).long()
    target = torch.where(any_valid, target, torch.full_like(target, ignore_index))
    return target[:, 0]  # [B, h, w]


def edge_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = 255,
              weight: float = 1.0) -> torch.Tensor:
    """Cross-entropy of edge logits ``[B, N, 2]`` against targets ``[B, N]`` (ignore skipped), times ``weight``."""
    flat_targets = targets.reshape(-1)
    if not bool((flat_targets != ignore_index).any()):
        return logits.sum() * 0.0
    loss = F.cross_entropy(logits.reshape(-1, 2).float(), flat_targets, ignore_index=ignore_index)
    return loss * weight
