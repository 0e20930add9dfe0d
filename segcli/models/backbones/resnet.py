"""ResNet / ResNeXt encoders from timm, optionally with DeepLabV3+'s ASPP (thesis 3.2.1).

NRD's encoder "is the same as DeepLabV3+": a CNN backbone plus an ASPP module (thesis 3.2.1).
The thesis builds on MMSegmentation, whose ResNets are "V1c" (a deep 3×3 stem 32-32-64); timm
builds the same network with ``stem_type="deep", stem_width=32`` (thesis 3.3, "Implementation
details": the settings "inherit the default settings in MMSegmentation").

Decisions (thesis 3.2.1, 3.3.1):

* **The ASPP belongs to the encoder.** The thesis counts it in the encoder ("total" = encoder +
  decoder, table 3.1) and all three decoders compared there (NRD, DeepLabV3+, bilinear) sit on
  the same encoder output ``F``. So it lives here, switched on with ``aspp: true``; its output
  *replaces* the last requested feature level, and heads read it as ``in_index: -1``.
* ASPP = MMSegmentation's depthwise-separable ASPP: an image-pool branch (global average pool,
  1×1 conv), a 1×1 branch, one depthwise-separable 3×3 branch per further dilation, and a 3×3
  bottleneck ``(1 + len(dilations))·C -> C``; every conv is followed by BN + ReLU.
  ``C = aspp_channels`` (512; the R18 recipes set 128). The default dilations are DeepLabV3+'s
  (1, 12, 24, 36); at stride 32 the dilated branches mostly see zero padding, kept for fidelity
  with the thesis' "same encoder as DeepLabV3+". The authors' released NRD configs use
  (1, 3, 6, 9), selectable with ``aspp_dilations``; FLOPs are identical.
* The image-pool branch normalises a 1×1 map, so BatchNorm needs more than one image per
  (Sync)BN group in training (as in MMSegmentation).
* ``output_stride`` 16/8 dilates the last stages (timm's ``output_stride``) for the thesis'
  dilated-encoder comparisons; ``out_strides`` then reports the true strides.
* Pretrained weights (a local .pth/.pt/.bin/.safetensors/.npz, ``timm:NAME`` or a URL) in timm's key
  format, or MMCV's (MMSegmentation's ``open-mmlab://resnet50_v1c``, the thesis' ImageNet
  weights; :func:`checkpoint_filter_fn` renames the stem). timm's ``resnet50c.gluon_in1k`` and
  ``resnet101c.gluon_in1k`` have the same V1c architecture. The classifier (``fc.*``) is
  dropped; any other mismatch is a :class:`SegcliError`.

Outputs: the timm feature levels in ``out_indices`` (0: stem, stride 2; 1..4: stages
"res2".."res5", strides 4..32), NCHW. With the defaults ``(1, 4)`` and ``aspp: true`` that is
``[low-level [B, 256, H/4, W/4], F [B, 512, H/32, W/32]]`` for R50/R101 (64 low-level channels
for R18). Input sizes need not be multiples of 32: every stride-2 layer rounds up, so level
``i`` has ``ceil(H / stride_i)`` rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import timm
import torch
from timm.models import get_arch_name
from torch import nn

from ...configurable import NonNegativeInt, PositiveInt
from ...errors import SegcliError, did_you_mean
from ...ops.batchnorm import fold_batchnorm, foldable_batchnorm
from ...registry import BACKBONES
from ..layers import ConvBNReLU, SeparableConvBNReLU
from ..base import Backbone
from .weights import load_state_dict_file, resolve_weights

NUM_LEVELS = 5  # timm ResNet feature levels: stem + 4 stages


@dataclass(frozen=True)
class ResNetConfig:
    name: str = "resnet50"  # timm name: resnet18/50/101, resnext101_32x4d, ...
    deep_stem: bool = True  # MMSegmentation "V1c" stem (timm stem_type="deep", stem_width=32)
    pretrained: str | None = None  # timm-format weights: a local file, timm:NAME or a URL
    output_stride: Literal[8, 16, 32] = 32
    out_indices: tuple[NonNegativeInt, ...] = (1, 4)  # timm feature levels (1 = stride 4, 4 = last stage)
    aspp: bool = False  # attach DeepLabV3+'s ASPP to the last level (NRD's encoder)
    aspp_channels: PositiveInt = 512
    aspp_dilations: tuple[PositiveInt, ...] = (1, 12, 24, 36)
    stem_width: PositiveInt = 32  # deep stem widths (w, w, 2w): MMSegmentation's stem_channels = 2w
    channels: tuple[PositiveInt, PositiveInt, PositiveInt, PositiveInt] | None = None  # stage widths; None = the timm model's (64, 128, 256, 512)

    def __post_init__(self):
        if not self.out_indices or list(self.out_indices) != sorted(set(self.out_indices)):
            raise ValueError(f"out_indices must be increasing and unique, got {list(self.out_indices)}")
        if not all(0 <= i < NUM_LEVELS for i in self.out_indices):
            raise ValueError(f"out_indices must be in 0..{NUM_LEVELS - 1}, got {list(self.out_indices)}")
        if self.aspp and (self.aspp_channels < 1 or not self.aspp_dilations):
            raise ValueError("aspp needs aspp_channels >= 1 and at least one dilation")


class ASPP(nn.Module):
    """Depthwise-separable atrous spatial pyramid pooling (DeepLabV3+; see module docstring)."""

    def __init__(self, in_channels: int, channels: int, dilations: tuple[int, ...]):
        super().__init__()
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvBNReLU(in_channels, channels, 1))
        self.branches = nn.ModuleList(
            ConvBNReLU(in_channels, channels, 1) if d == 1
            else SeparableConvBNReLU(in_channels, channels, 3, dilation=d)
            for d in dilations)
        self.bottleneck = ConvBNReLU((len(dilations) + 1) * channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.image_pool(x).expand(-1, -1, *x.shape[-2:])  # [B, C, h, w] (bilinear from 1×1 = copy)
        branches = [pooled] + [branch(x) for branch in self.branches]  # (1 + len(dilations)) × [B, C, h, w]
        return self.bottleneck(torch.cat(branches, dim=1))  # [B, C, h, w]


# ----------------------------------------------------------------------------- weights


def read_timm_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A timm-format state dict from the file ``model.backbone.pretrained`` names (:func:`resolve_weights`)."""
    file = resolve_weights(str(path))
    if file.suffix == ".npz":
        import numpy as np

        try:
            with np.load(file) as arrays:
                state = {k: torch.from_numpy(arrays[k].copy()) for k in arrays.files}
        except Exception as err:  # corrupt or foreign file
            raise SegcliError(f"cannot read weights: {err.__class__.__name__}", str(file),
                              "give a .npz of timm state-dict arrays") from None
    else:
        state = load_state_dict_file(file)
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}


# MMCV ResNetV1c stem (``stem.{0..7}``: conv-bn-relu ×3) -> timm deep stem (``conv1.*`` + ``bn1``).
MMCV_STEM_RENAMES = {"stem.0.": "conv1.0.", "stem.1.": "conv1.1.", "stem.3.": "conv1.3.", "stem.4.": "conv1.4.",
                     "stem.6.": "conv1.6.", "stem.7.": "bn1."}


def checkpoint_filter_fn(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm keys for a ResNet state dict: MMCV "V1c" checkpoints (``open-mmlab://resnet50_v1c``,
    the thesis' ImageNet weights) differ from timm only in the stem's names; others pass as is."""
    if not any(k.startswith("stem.") for k in state):
        return state
    renamed = {}
    for key, value in state.items():
        prefix = next((p for p in MMCV_STEM_RENAMES if key.startswith(p)), None)
        renamed[MMCV_STEM_RENAMES[prefix] + key[len(prefix):] if prefix else key] = value
    return renamed


def load_timm_weights(body: nn.Module, state: dict[str, torch.Tensor], name: str, where: str) -> None:
    """Load a timm ResNet state dict into the feature extractor; the classifier is dropped.

    timm's ``features_only`` wrapper keeps the top-level module names (``conv1``, ``layer1``...),
    so timm checkpoints load key for key. Tensors missing from the file (other than BN's
    ``num_batches_tracked`` counters) or of the wrong shape are user errors.
    """
    own = body.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [k for k in state if k in own and own[k].shape != state[k].shape]
    if missing or unexpected or wrong_shape:
        problems = [f"{len(missing)} missing (e.g. {missing[:2]})" if missing else "",
                    f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})" if unexpected else "",
                    f"{len(wrong_shape)} of another shape (e.g. {wrong_shape[:2]})" if wrong_shape else ""]
        raise SegcliError(f"weights do not fit {name}: " + "; ".join(p for p in problems if p), where,
                          "use timm weights of the same architecture as model.backbone.name "
                          "(deep_stem must match too)")
    body.load_state_dict(state, strict=False)


# ----------------------------------------------------------------------------- backbone


class ResNetBackbone(Backbone):
    """timm ResNet feature levels ``out_indices``, the last one optionally through the ASPP."""

    def __init__(self, cfg: ResNetConfig):
        super().__init__()
        self.cfg = cfg
        family = timm.list_models(module="resnet")  # ResNet, ResNeXt, SE-ResNet, ... (one timm class)
        if get_arch_name(cfg.name) not in family:
            raise SegcliError(f"'{cfg.name}' is not a timm ResNet", "model.backbone.name",
                              did_you_mean(cfg.name, family))
        stem = {"stem_type": "deep", "stem_width": cfg.stem_width} if cfg.deep_stem else {}
        if cfg.channels is not None:
            stem["channels"] = tuple(cfg.channels)
        self.body = timm.create_model(cfg.name, pretrained=False, features_only=True, out_indices=cfg.out_indices,
                                      output_stride=cfg.output_stride, **stem)
        channels = list(self.body.feature_info.channels())
        self.out_strides = tuple(self.body.feature_info.reduction())
        # channels-last: the layout oneDNN's CPU convolutions, BatchNorm and pooling run natively (an
        # NCHW tensor is reordered at every layer; max-pooling NCHW is an order of magnitude slower),
        # in training and inference alike; the ASPP stays NCHW (see forward)
        self.body.to(memory_format=torch.channels_last)
        self.aspp = ASPP(channels[-1], cfg.aspp_channels, cfg.aspp_dilations) if cfg.aspp else None
        if self.aspp is not None:
            channels[-1] = cfg.aspp_channels
        self.out_channels = tuple(channels)
        if cfg.pretrained:
            state = checkpoint_filter_fn(read_timm_weights(cfg.pretrained))
            load_timm_weights(self.body, state, cfg.name, str(cfg.pretrained))

    def fuse_for_inference(self) -> None:
        """Inference-only rewrite (eval mode, never trained again): the BatchNorms of timm's ResNet
        blocks folded into the convolution before them, ``convN -> bnN`` (a deep stem's ``conv1`` is
        a sequence whose last convolution feeds ``bn1``). The ASPP's and the downsample paths'
        pairs are sequences, which :func:`~segcli.engine.inference.prepare_for_inference` folds
        for the whole model (:func:`fold_batchnorms`) before calling this."""
        for block in self.body.modules():
            for name, child in list(block.named_children()):
                if not (name.startswith("bn") and foldable_batchnorm(child)):
                    continue
                conv = getattr(block, "conv" + name[2:], None)
                if isinstance(conv, nn.Sequential):
                    conv = conv[-1]
                if isinstance(conv, nn.Conv2d):
                    fold_batchnorm(conv, child)
                    setattr(block, name, nn.Identity())

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        images = images.contiguous(memory_format=torch.channels_last)
        features = list(self.body(images))  # [B, C_i, ceil(H/s_i), ceil(W/s_i)] per level
        if self.aspp is not None:
            # the ASPP stays NCHW: its dilated depthwise convolutions on a small map run several
            # times slower channels-last
            features[-1] = self.aspp(features[-1].contiguous())  # [B, aspp_channels, H/32, W/32]
        return features

    def no_weight_decay_names(self) -> set[str]:
        # Norms and biases are excluded by the optimizer builder; ResNets have nothing else.
        return set()


@BACKBONES.register("resnet", ResNetConfig)
def build_resnet(cfg: ResNetConfig) -> ResNetBackbone:
    return ResNetBackbone(cfg)
