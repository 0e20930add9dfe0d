"""Recipe ``model`` section -> an ``nn.Module`` segmentor, via the registries.

Every part is a component, typed once at load (``segcli/recipe.py``): the backbone, the heads and
the segmentor that wires them (``model.type`` + ``model.options``, :attr:`ModelConfig.segmentor`).
"""
from __future__ import annotations

from ..configurable import Component
from ..registry import BACKBONES, HEADS, SEGMENTORS
from .base import HeadContext


def build_backbone(component: Component):
    return BACKBONES.get(component.type, "model.backbone.type").build(component.cfg)


def build_head(component: Component, context: HeadContext):
    return HEADS.get(component.type, "model.decode_head.type").build(component.cfg, context)


def build_segmentor(model_cfg, num_classes: int, ignore_index: int = 255):
    """Build the segmentor of a recipe's ``model`` section for ``num_classes`` classes."""
    backbone = build_backbone(model_cfg.backbone)
    context = HeadContext(tuple(backbone.out_channels), tuple(backbone.out_strides), num_classes, ignore_index)
    decode_head = build_head(model_cfg.decode_head, context)
    aux_heads = [build_head(c, context) for c in model_cfg.aux_heads]
    segmentor = model_cfg.segmentor
    return SEGMENTORS.get(segmentor.type, "model.type").build(segmentor.cfg, backbone, decode_head, aux_heads)
