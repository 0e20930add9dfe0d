"""The ATM loss: class CE with "no object" + sigmoid focal + dice on masks (thesis eq. 4.5).

No Hungarian matching: query k is class k (thesis 4.2.1; released ``ATMLoss``). For every image:

* **Class loss** ``loss_ce``: cross-entropy over all K queries of ``[B, K, K+1]`` logits; the
  target of query k is k if class k has at least one non-ignored pixel in the image's labels,
  else "no object" (index K). As in DETR/MaskFormer the "no object" class has weight
  ``eos_coef`` (0.1) and the mean is the weighted mean ``Σ w_t·CE / Σ w_t``.
* **Mask losses** on the present (image, class) pairs only, at label resolution (the mask
  logits are upsampled bilinearly to the label size): sigmoid focal loss (α 0.25, γ 2) ×20
  (``loss_focal``, mean over pixels per mask) and dice loss with +1 smoothing ×1
  (``loss_dice``). Both are summed over the pairs of the batch and divided by their number
  (averaged over DDP processes, at least 1), as in the released code.
* **Ignore pixels** (label ``ignore_index``) are negatives of every class mask in focal and dice
  (``mask_loss_ignore="negative"``, the default), as in the released code: zbwxp/SegVit
  ``losses/atm_loss.py`` ``ATMLoss.prepare_targets`` builds each mask as ``label == class`` over
  the whole image and ``losses/criterion.py`` ``sigmoid_focal_loss`` / ``dice_loss`` average and
  sum over every pixel. Every published SegViT number was trained so. ``"exclude"`` is the named
  alternative (thesis 4.2.1 does not discuss ignore pixels): an ignore pixel carries no label, so
  it is left out of both terms and the focal mean is over the mask's valid pixels. It matters at
  crop borders, where the padding is labelled ignore.
* **Deep supervision**: each entry of ``outputs["aux_outputs"]`` (earlier stages' class logits
  and cumulative masks) gets the same three terms, named ``s{i}.loss_ce`` etc.
* **Binary class heads** (``binary=True``, DToP's released ``PruneHead``: query k only says
  whether class k is present): the class loss is the same weighted CE over ``[B, K, 2]`` logits
  with target 0 ("present") or 1 ("absent", weight ``eos_coef``).
* All terms are multiplied by ``loss_weight`` and computed in float32. An image with no valid
  pixel contributes only "no object" CE terms; a batch with no present class gives zero (but
  differentiable) focal and dice terms, never NaN.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def present_classes(labels: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """``[B, K]`` bool: class k has at least one (non-ignored) pixel in image b of ``labels`` [B, H, W]."""
    batch = labels.shape[0]
    index = labels.reshape(batch, -1)  # [B, H*W]
    index = torch.where(index == ignore_index, torch.full_like(index, num_classes), index)  # ignore -> slot K
    present = torch.zeros(batch, num_classes + 1, dtype=torch.bool, device=labels.device)
    present.scatter_(1, index, True)  # out-of-range labels raise here
    return present[:, :num_classes]


def class_targets(present: torch.Tensor) -> torch.Tensor:
    """``[B, K]`` CE targets: k where class k is present, else K ("no object")."""
    num_classes = present.shape[1]
    classes = torch.arange(num_classes, device=present.device).expand_as(present)
    return torch.where(present, classes, torch.full_like(classes, num_classes))


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None,
                       alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Per-mask focal loss ``[P]``: mean over the valid pixels of ``logits``/``targets`` [P, H*W]."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    if valid is None:
        return loss.mean(dim=1)
    valid = valid.to(loss.dtype)
    return (loss * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per-mask dice loss ``[P]`` with +1 smoothing over the valid pixels of [P, H*W] inputs."""
    prob = logits.sigmoid()
    if valid is not None:
        prob = prob * valid.to(prob.dtype)
        targets = targets * valid.to(targets.dtype)
    numerator = 2 * (prob * targets).sum(dim=1)
    denominator = prob.sum(dim=1) + targets.sum(dim=1)
    return 1 - (numerator + 1) / (denominator + 1)


def _average_count(count: int, device: torch.device) -> float:
    """The number of masks averaged over DDP processes (at least 1), as in the released code."""
    if dist.is_available() and dist.is_initialized():
        total = torch.tensor([float(count)], device=device)
        dist.all_reduce(total)
        return max(total.item() / dist.get_world_size(), 1.0)
    return max(float(count), 1.0)


def _average_sum(value: torch.Tensor, labels_device: torch.device) -> torch.Tensor:
    """A (detached) sum averaged over DDP processes; itself without DDP."""
    value = value.detach().float()
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return value.clamp(min=1e-12)


class ATMCriterion(nn.Module):
    """Loss terms for ATM outputs (``pred_logits`` [B, K, K+1], ``pred_masks`` [B, K, h, w],
    optional ``aux_outputs``) against ``labels`` [B, H, W]; see the module docstring."""

    def __init__(
        self,
        num_classes: int,
        *,
        ignore_index: int = 255,
        eos_coef: float = 0.1,
        ce_weight: float = 1.0,
        focal_weight: float = 20.0,
        dice_weight: float = 1.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        mask_loss_ignore: Literal["exclude", "negative"] = "negative",
        loss_weight: float = 1.0,
        binary: bool = False,
    ):
        super().__init__()
        if mask_loss_ignore not in ("exclude", "negative"):
            raise ValueError(f"unknown mask_loss_ignore {mask_loss_ignore!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.ce_weight = ce_weight
        self.focal_weight = focal_weight
        self.dice_weight = dice_weight
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.mask_loss_ignore = mask_loss_ignore
        self.loss_weight = loss_weight
        self.binary = binary
        class_weight = torch.ones(2 if binary else num_classes + 1)
        class_weight[-1] = eos_coef
        self.register_buffer("class_weight", class_weight, persistent=False)  # not in checkpoints

    def forward(self, outputs: dict, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        present = present_classes(labels, self.num_classes, self.ignore_index)  # [B, K]
        targets = (~present).long() if self.binary else class_targets(present)  # [B, K]: binary 0 = present
        image_idx, class_idx = present.nonzero(as_tuple=True)  # the P present (image, class) pairs
        label_rows = labels[image_idx].flatten(1)  # [P, H*W]
        mask_targets = (label_rows == class_idx[:, None]).float()  # [P, H*W]
        valid = label_rows != self.ignore_index if self.mask_loss_ignore == "exclude" else None
        num_masks = _average_count(int(image_idx.numel()), labels.device)
        pairs = (image_idx, class_idx, mask_targets, valid, num_masks)

        losses = self._terms(outputs, targets, labels.shape[-2:], pairs)
        for i, aux in enumerate(outputs.get("aux_outputs", ())):
            losses.update({f"s{i}.{k}": v for k, v in self._terms(aux, targets, labels.shape[-2:], pairs).items()})
        return losses

    def _terms(self, outputs: dict, targets: torch.Tensor, size, pairs) -> dict[str, torch.Tensor]:
        image_idx, class_idx, mask_targets, valid, num_masks = pairs
        class_logits = outputs["pred_logits"].float()  # [B, K, K+1]
        # Weighted mean over the *global* batch: Σ w·ce / Σ w with Σ w averaged across DDP processes
        # (like the mask count), so N processes × B/N images give the loss of one process × B.
        per_query = F.cross_entropy(class_logits.transpose(1, 2), targets, weight=self.class_weight,
                                    reduction="none")  # [B, K], already multiplied by the target's weight
        weight_sum = _average_sum(self.class_weight[targets].sum(), labels_device=per_query.device)
        loss_ce = per_query.sum() / weight_sum
        mask_logits = outputs["pred_masks"][image_idx, class_idx].float()  # [P, h, w]
        if image_idx.numel() == 0:  # nothing present in the batch: zero, but keep the graph
            zero = outputs["pred_masks"].float().sum() * 0.0
            loss_focal, loss_dice = zero, zero
        else:
            mask_logits = F.interpolate(mask_logits[:, None], size=tuple(size), mode="bilinear", align_corners=False)
            mask_logits = mask_logits.flatten(1)  # [P, H*W]
            loss_focal = sigmoid_focal_loss(mask_logits, mask_targets, valid, self.focal_alpha, self.focal_gamma)
            loss_focal = loss_focal.sum() / num_masks
            loss_dice = dice_loss(mask_logits, mask_targets, valid).sum() / num_masks
        scale = self.loss_weight
        return {
            "loss_ce": loss_ce * (self.ce_weight * scale),
            "loss_focal": loss_focal * (self.focal_weight * scale),
            "loss_dice": loss_dice * (self.dice_weight * scale),
        }
