"""Segmentation metrics (MMSegmentation's conventions), accumulated over the whole set.

A confusion matrix ``[K, K]`` (rows: ground truth, columns: prediction) is accumulated on the
model's device; ignore pixels are dropped before counting. IoU_c = I/(P+G-I), NaN when the
class is absent from both GT and predictions (skipped by the mean); a class predicted but absent
from GT has IoU 0 and counts. Acc_c = I/G (NaN when G = 0); mAcc = nanmean; aAcc = ΣI/ΣG.
Under DDP the matrices are summed across processes before :meth:`SegEvaluator.evaluate`.

Trimap (thesis 3.3, ``--trimap W``): the same metric restricted to pixels within W px of a GT
class boundary. A boundary is where two *valid* classes meet (4-neighbourhood); an edge between a
class and ignore is not a class boundary (decision: ignore is not a class).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def class_boundary_band(labels: torch.Tensor, width: int, ignore_index: int = 255) -> torch.Tensor:
    """Pixels within ``width`` px (Chebyshev) of a boundary between two valid classes: [B, H, W] bool."""
    lab = labels.long()
    valid = lab != ignore_index
    edge = torch.zeros_like(valid)
    diff_v = (lab[:, 1:, :] != lab[:, :-1, :]) & valid[:, 1:, :] & valid[:, :-1, :]
    diff_h = (lab[:, :, 1:] != lab[:, :, :-1]) & valid[:, :, 1:] & valid[:, :, :-1]
    edge[:, 1:, :] |= diff_v
    edge[:, :-1, :] |= diff_v
    edge[:, :, 1:] |= diff_h
    edge[:, :, :-1] |= diff_h
    if width > 1:
        band = F.max_pool2d(edge[:, None].float(), kernel_size=2 * width - 1, stride=1, padding=width - 1)[:, 0] > 0
    else:
        band = edge
    return band & valid


class SegEvaluator:
    """``reset / process / evaluate`` over a confusion matrix."""

    def __init__(self, num_classes: int, class_names: list[str] | tuple[str, ...] | None = None,
                 ignore_index: int = 255, device: torch.device | str = "cpu", trimap_width: int | None = None,
                 mean_classes: list[int] | tuple[int, ...] | None = None):
        """``mean_classes``: the classes that enter mIoU/mAcc (None = all). The others' pixels
        still count (a prediction of class c on them is a false positive of c) but their own
        IoU/Acc are reported as None: e.g. classes a continual-learning step has not learnt yet."""
        self.num_classes = num_classes
        self.mean_classes = None if mean_classes is None else sorted(set(int(c) for c in mean_classes))
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.ignore_index = ignore_index
        self.device = torch.device(device)
        self.trimap_width = trimap_width
        self.reset()

    def reset(self) -> None:
        k = self.num_classes
        self.confusion = torch.zeros(k, k, dtype=torch.int64, device=self.device)
        self.trimap_confusion = torch.zeros(k, k, dtype=torch.int64, device=self.device) if self.trimap_width else None

    def _accumulate(self, matrix: torch.Tensor, pred: torch.Tensor, label: torch.Tensor, keep: torch.Tensor) -> None:
        k = self.num_classes
        index = label[keep] * k + pred[keep]
        matrix += torch.bincount(index, minlength=k * k).reshape(k, k)

    def process(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """``pred`` and ``label`` [B, H, W] (or [H, W]) class ids; label 255 = ignore."""
        pred = pred.to(self.device).long()
        label = label.to(self.device).long()
        if pred.dim() == 2:
            pred, label = pred[None], label[None]
        keep = label != self.ignore_index
        self._accumulate(self.confusion, pred, label, keep)
        if self.trimap_confusion is not None:
            band = class_boundary_band(label, self.trimap_width, self.ignore_index)
            self._accumulate(self.trimap_confusion, pred, label, band)

    def all_reduce(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.confusion)
            if self.trimap_confusion is not None:
                dist.all_reduce(self.trimap_confusion)

    @staticmethod
    def metrics_from_confusion(confusion: torch.Tensor, mean_classes: list[int] | None = None) -> dict:
        conf = confusion.double().cpu()
        inter = conf.diag()
        gt = conf.sum(1)
        pred = conf.sum(0)
        union = gt + pred - inter
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, float("nan")))
        acc = torch.where(gt > 0, inter / gt.clamp(min=1), torch.full_like(inter, float("nan")))
        total = gt.sum()
        if mean_classes is not None:  # classes outside the mean: NaN, so they drop out of it
            outside = torch.ones_like(iou, dtype=torch.bool)
            outside[list(mean_classes)] = False
            iou = iou.masked_fill(outside, float("nan"))
            acc = acc.masked_fill(outside, float("nan"))
        return {
            "mIoU": float(torch.nanmean(iou) * 100) if not torch.isnan(iou).all() else float("nan"),
            "mAcc": float(torch.nanmean(acc) * 100) if not torch.isnan(acc).all() else float("nan"),
            "aAcc": float(inter.sum() / total * 100) if total > 0 else float("nan"),
            "iou": (iou * 100).tolist(),
            "acc": (acc * 100).tolist(),
        }

    def evaluate(self) -> dict:
        """``{"mIoU", "mAcc", "aAcc", "per_class": [{"class", "IoU", "Acc"}], ["trimap_mIoU"]}`` (percent)."""
        m = self.metrics_from_confusion(self.confusion, self.mean_classes)
        result = {
            "mIoU": m["mIoU"],
            "mAcc": m["mAcc"],
            "aAcc": m["aAcc"],
            "per_class": [
                {"class": name, "IoU": _clean(iou), "Acc": _clean(acc)}
                for name, iou, acc in zip(self.class_names, m["iou"], m["acc"])
            ],
        }
        if self.trimap_confusion is not None:
            result["trimap_mIoU"] = self.metrics_from_confusion(self.trimap_confusion, self.mean_classes)["mIoU"]
            result["trimap_width"] = self.trimap_width
        return result


def _clean(value: float) -> float | None:
    """NaN -> None so that JSON output stays valid."""
    return None if math.isnan(value) else value
