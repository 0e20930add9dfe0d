"""Recipe ``model`` section -> an ``nn.Module`` segmentor, via the registries."""
from __future__ import annotations

from ..configurable import Component, from_dict
from ..registry import BACKBONES, HEADS, SEGMENTORS
from .base import HeadContext


def build_backbone(component: Component):
    return BACKBONES.get(component.type, "model.backbone.type").builder(component.cfg)


def build_head(component: Component, context: HeadContext):
    return HEADS.get(component.type, "model.decode_head.type").builder(component.cfg, context)


def build_segmentor(model_cfg, num_classes: int, ignore_index: int = 255):
    """Build the segmentor of a recipe's ``model`` section for ``num_classes`` classes."""
    backbone = build_backbone(model_cfg.backbone)
    context = HeadContext(tuple(backbone.out_channels), tuple(backbone.out_strides), num_classes, ignore_index)
    decode_head = build_head(model_cfg.decode_head, context)
    aux_heads = [build_head(c, context) for c in model_cfg.aux_heads]
    entry = SEGMENTORS.get(model_cfg.type, "model.type")
    options = model_cfg.options
    if entry.config_cls is not None and not isinstance(options, entry.config_cls):
        # a ModelConfig written in code rather than loaded from a recipe: type its options here
        options = from_dict(entry.config_cls, options, "model.options")
    return entry.builder(options, backbone, decode_head, aux_heads)
