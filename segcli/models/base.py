"""The contracts between backbones, heads and segmentors.

Backbones and heads know nothing of each other beyond tensors and shapes (detectron2's
meta-architecture idea):

* a **backbone** maps images ``[B, 3, H, W]`` to a list of feature maps ``[B, C_i, H/s_i, W/s_i]``
  (``out_channels``/``out_strides`` describe them);
* a **decode head** maps that list to a dict of outputs, computes its own weighted losses from
  them (``loss``) and turns them into per-class scores at a requested size (``score_map``).
  What a wrapper needs from a head is on the same contract: the one backbone output it reads
  (``input_layer``), whether and how it runs on a packed subset of tokens
  (``supports_token_input``, ``forward_tokens``), the format of its outputs (``output_format``)
  and the label value its loss skips (``ignore_index``);
* a **logit head** (:class:`LogitHead`: FCN, SETR, bilinear, DeepLabV3+, NRD) is a decode head
  whose outputs are class logits ``{"logits": [B, K, h, w]}`` trained with pixel CE; the base
  holds the classifier, the loss and the score upsampling, a subclass only its feature path;
* a **segmentor** (``segmentor.py``) wires one backbone, one decode head and optional auxiliary
  heads; wrappers (DToP, Shrunk, continual learning) compose it. Parts a wrapper must not train
  are listed in one place (:class:`FrozenPartsMixin`).

Registered builders receive their typed config and a :class:`HeadContext`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from ..errors import SegcliError
from ..ops.scores import ScoreMap, UpsampledScores, resize  # noqa: F401 (resize: re-exported)
from .exportable import FULL, ExportSupport, static_only
from .losses import cross_entropy


@dataclass(frozen=True)
class HeadContext:
    """What a head builder is told about its surroundings."""

    in_channels: tuple[int, ...]  # channels of every backbone output
    in_strides: tuple[int, ...]  # stride of every backbone output
    num_classes: int
    ignore_index: int = 255


class Backbone(nn.Module):
    """Images -> list of NCHW feature maps. Subclasses set ``out_channels`` and ``out_strides``."""

    out_channels: tuple[int, ...] = ()
    out_strides: tuple[int, ...] = ()

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def layer_id(self, param_name: str) -> int:
        """Depth of a parameter for layer-wise lr decay (0 = embeddings). Default: one layer."""
        return 0

    @property
    def num_layers(self) -> int:
        return 1

    def no_weight_decay_names(self) -> set[str]:
        """Parameter names (relative to the backbone) that take no weight decay."""
        return set()

    def export_support(self) -> ExportSupport:
        """What an exported graph of this backbone can be (``models/exportable.py``). Default: all."""
        return FULL


class DecodeHead(nn.Module):
    """Features -> outputs -> (losses | per-class scores).

    ``__init__`` takes the :class:`HeadContext` and keeps ``num_classes`` and ``ignore_index``.
    The defaults of the wrapper-facing methods describe a head that reads several backbone
    outputs and needs them as full maps.
    """

    num_classes: int
    # what ``forward`` returns: "logits" = {"logits": [B, K, h, w]}; "class_masks" = mask
    # classification {"pred_logits": [B, Q, K+1], "pred_masks": [B, Q, h, w], ...} (ATM)
    output_format: ClassVar[Literal["logits", "class_masks"]] = "logits"

    def __init__(self, ctx: HeadContext):
        super().__init__()
        self.num_classes = ctx.num_classes
        self._ignore_index = ctx.ignore_index

    @property
    def ignore_index(self) -> int:
        """The label value this head's loss skips (the dataset's ignore index)."""
        return self._ignore_index

    def forward(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def loss(self, outputs: dict, labels: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover
        """Weighted loss terms; ``labels`` is ``[B, H, W]`` long with ignore = ``ignore_index``."""
        raise NotImplementedError

    def score_map(self, outputs: dict, size: tuple[int, int]) -> ScoreMap:  # pragma: no cover - interface
        """The head's one scoring entry: per-class scores ``[B, K, *size]`` whose argmax is the
        prediction, left unformed (``ops/scores.py``) so that labels can be taken band by band; a
        head whose scores are an upsampled low-resolution map returns
        :class:`~segcli.ops.scores.UpsampledScores`, one that only has the full tensor a
        :class:`~segcli.ops.scores.DenseScores`."""
        raise NotImplementedError

    def seg_logits(self, outputs: dict, size: tuple[int, int]) -> torch.Tensor:
        """:meth:`score_map` formed whole: ``[B, K, *size]`` (losses, and wrappers that need a full map)."""
        return self.score_map(outputs, size).full()

    def input_layer(self) -> int | None:
        """The one backbone output this head reads (0-based position in the feature list), or None
        if it reads several. Wrappers that run heads between blocks (DToP) need it."""
        return None

    def export_support(self) -> ExportSupport:
        """What an exported graph of this head can be (``models/exportable.py``). Default: all."""
        return FULL

    @property
    def supports_token_input(self) -> bool:
        """True if :meth:`forward_tokens` can run this head on a packed subset of its layer's tokens."""
        return False

    def forward_tokens(self, tokens: torch.Tensor, pad_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The head on tokens ``[B, M, C]`` of its :meth:`input_layer` (``pad_mask`` [B, M], True =
        padding): ``forward``'s outputs with the spatial axes ``h, w`` replaced by the token axis M.
        Only where :attr:`supports_token_input`."""
        raise NotImplementedError(f"{type(self).__name__} needs its input as a full feature map")


class LogitHead(DecodeHead):
    """A decode head that outputs class logits ``{"logits": [B, K, h, w]}`` and learns by pixel CE.

    A subclass builds its feature path, calls :meth:`build_classifier` for the usual
    dropout + 1×1 classifier (a head that makes its logits otherwise, NRD, skips it), sets
    ``logit_stride`` and writes ``forward``; the loss and the scores come from here:

    * :meth:`score_map` upsamples the logits to the requested size, grid-aligned
      (:func:`upsample_to_input`) when ``logit_stride`` (input pixels per logit pixel) is set,
      with a plain bilinear resize when it is None;
    * :meth:`loss` is ``loss_weight`` × CE of those scores at label size, skipping ``ignore_index``.
    """

    output_format = "logits"
    logit_stride: float | None = None

    def __init__(self, ctx: HeadContext, loss_weight: float = 1.0):
        super().__init__(ctx)
        self.loss_weight = loss_weight

    def build_classifier(self, channels: int, dropout: float, init_std: float | None = 0.01) -> None:
        """``self.dropout`` (``Dropout2d``) and ``self.classifier`` (1×1 conv ``channels -> K``, the
        name every logit head's checkpoints use). ``init_std``: normal weights of that std and zero
        bias (MMSegmentation's ``cls_seg``); None keeps PyTorch's default initialisation."""
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, self.num_classes, 1)
        if init_std is not None:
            nn.init.normal_(self.classifier.weight, std=init_std)
            nn.init.zeros_(self.classifier.bias)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout and the 1×1 classifier: ``[B, C, h, w]`` -> logits ``[B, K, h, w]``."""
        return self.classifier(self.dropout(x))

    def loss(self, outputs: dict, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.seg_logits(outputs, tuple(labels.shape[-2:]))  # [B, K, H, W]
        return {"loss_ce": self.loss_weight * cross_entropy(logits, labels, self.ignore_index)}

    def score_map(self, outputs: dict, size: tuple[int, int]) -> UpsampledScores:
        logits = outputs["logits"]  # [B, K, h, w]
        return UpsampledScores(logits, upsample_extent(logits, self.logit_stride, size), size)

    def export_support(self) -> ExportSupport:
        """Static only: the upsampling extent (:func:`upsample_extent`; NRD also its patch grid) is
        computed as Python ints, which a capture bakes into the graph's Resize/Reshape, so a dynamic
        graph fails at run time (``tests/test_export.py``)."""
        return static_only(f"the {type(self).__name__} turns sizes into Python ints that a capture fixes")

    def forward_tokens(self, tokens: torch.Tensor, pad_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """A per-token head on tokens ``[B, M, C]`` -> ``{"logits": [B, K, M]}``: the tokens go through
        ``forward`` as a ``[B, C, M, 1]`` column (padding rows give values nobody reads)."""
        if not self.supports_token_input:
            return super().forward_tokens(tokens, pad_mask)
        layer = self.input_layer()
        features = [None] * (layer + 1)
        features[layer] = tokens.transpose(1, 2).unsqueeze(-1)  # [B, C, M, 1]
        return {"logits": self(features)["logits"].squeeze(-1)}  # [B, K, M]


class FrozenPartsMixin:
    """For a segmentor with parts that must not learn (a frozen backbone, earlier tasks' heads).

    :meth:`frozen_modules` names them; :meth:`freeze_parts` (call it at the end of ``__init__``)
    turns their gradients off, and :meth:`train` keeps them in eval mode when the model trains,
    so dropout, drop-path and normalisation statistics behave as at test time. Put it before
    ``nn.Module`` (or a module subclass) in the bases.
    """

    def frozen_modules(self) -> list[nn.Module]:
        return []

    def freeze_parts(self) -> None:
        for module in self.frozen_modules():
            freeze(module)

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self


def freeze(module: nn.Module) -> nn.Module:
    """Turn off the gradients of ``module``'s parameters (the optimizer then skips them)."""
    return module.requires_grad_(False)


def upsample_extent(logits: torch.Tensor, stride: float | None, size: tuple[int, int]) -> tuple[int, int]:
    """The size a stride-``stride`` map ``[B, K, h, w]`` is resized to before cropping to ``size``:
    the grid-aligned extent ``(h·stride, w·stride)`` when it covers ``size`` by less than one
    stride, else ``size`` itself (a plain resize; also for ``stride=None``)."""
    size = (int(size[0]), int(size[1]))  # plain ints, also under tracing (fvcore)
    if stride is None:
        return size
    extent = (round(int(logits.shape[-2]) * stride), round(int(logits.shape[-1]) * stride))
    if all(0 <= e - s < stride for e, s in zip(extent, size, strict=True)):
        return extent
    return size


def upsample_to_input(logits: torch.Tensor, stride: float, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of a stride-``stride`` map ``[B, K, h, w]`` to ``[B, K, *size]``, grid-aligned."""
    return UpsampledScores(logits, upsample_extent(logits, stride, size), size).full()  # [B, K, *size]


def check_in_index(index: int, ctx: HeadContext, head: str) -> int:
    """``index`` as a non-negative position in the backbone outputs, or a :class:`SegcliError`."""
    count = len(ctx.in_channels)
    if not -count <= index < count:
        raise SegcliError(f"in_index {index} is out of range: the backbone has {count} outputs", f"{head} head",
                          f"use 0..{count - 1} (or -1 for the last); the backbone's out_indices choose them")
    return index % count
