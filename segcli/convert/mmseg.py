"""Key maps of MMSegmentation 0.x model-zoo checkpoints (``EncoderDecoder`` state dicts).

DeepLabV3+ (``ResNetV1c`` + ``DepthwiseSeparableASPPHead`` + an ``FCNHead`` auxiliary head):
segcli keeps the ASPP in the encoder (``resnet`` with ``aspp: true``, because NRD shares it,
thesis 3.2.1), so the head's ``image_pool`` / ``aspp_modules`` / ``bottleneck`` go to
``backbone.aspp``; its ``c1_bottleneck`` / ``sep_bottleneck`` / ``conv_seg`` stay in the head.
The ResNet's stem is MMCV's ``stem.{0..7}`` (timm's ``conv1.*`` / ``bn1``), the stages have
timm's names. MMSegmentation's stages 0..3 are timm's feature levels 1..4.

SETR (``VisionTransformer`` + ``SETRUPHead``): the ViT keys are those of
:func:`segcli.convert.segvit.mmseg_vit_rules`, with the cls token kept (the zoo's SETR runs
``with_cls_token=True``). ``SETRUPHead``'s ``up_convs.{i}`` is a ``ConvModule`` (conv + BN) and
an upsampling per step, which is segcli's ``convs`` Sequential of four modules per step (conv,
BN, ReLU, upsample): step ``i``'s conv is ``convs.{4i}`` and its BN ``convs.{4i+1}``; ``conv_seg``
is ``classifier``. ``auxiliary_head.{j}`` (a list in the zoo's configs) is ``aux_heads.{j}``.
"""
from __future__ import annotations

import re

from ..models.backbones.resnet import MMCV_STEM_RENAMES
from .keymap import Rule, segcli_head_names
from .segvit import mmseg_vit_rules

_HEAD = r"(decode_head|auxiliary_head\.\d+)"


def setr_rules() -> list[Rule]:
    """MMSegmentation SETR (any number of auxiliary SETRUPHeads); apply with ``rename=setr_rename``."""
    rules = [Rule(r"backbone\.cls_token", "backbone.vit.cls_token")] + [
        rule for rule in mmseg_vit_rules() if rule.pattern != r"backbone\.cls_token"]
    return rules + [
        Rule(rf"{_HEAD}\.norm\.(weight|bias)", r"@\1@.norm.\2"),
        Rule(rf"{_HEAD}\.up_convs\.(\d+)\.0\.conv\.weight", r"@\1@.convs.#\2#0.weight"),
        Rule(rf"{_HEAD}\.up_convs\.(\d+)\.0\.bn\.(\w+)", r"@\1@.convs.#\2#1.\3"),
        Rule(rf"{_HEAD}\.conv_seg\.(weight|bias)", r"@\1@.classifier.\2"),
    ]


_PLACEHOLDER_STEP = re.compile(r"#(\d+)#(\d)")


def setr_rename(key: str) -> str:
    """``@head@`` -> segcli's head name; ``#i#j`` -> the index ``4i + j`` in ``convs``."""
    return _PLACEHOLDER_STEP.sub(lambda m: str(4 * int(m.group(1)) + int(m.group(2))), segcli_head_names(key))


def deeplabv3plus_rules() -> list[Rule]:
    """MMSegmentation DeepLabV3+ with one FCN auxiliary head (the stem renamed as the ResNet backbone
    renames MMCV's V1c weights, :data:`~segcli.models.backbones.resnet.MMCV_STEM_RENAMES`)."""
    sep = r"(depthwise|pointwise)_conv\.(conv|bn)\.(\w+)"
    stem = [Rule(r"backbone\." + re.escape(mmcv) + r"(\w+)", f"backbone.body.{timm}" + r"\1")
            for mmcv, timm in MMCV_STEM_RENAMES.items()]
    return stem + [
        Rule(r"backbone\.(layer\d\..*)", r"backbone.body.\1"),
        Rule(r"decode_head\.image_pool\.1\.(conv|bn)\.(\w+)", r"backbone.aspp.image_pool.1.\1.\2"),
        Rule(r"decode_head\.aspp_modules\.0\.(conv|bn)\.(\w+)", r"backbone.aspp.branches.0.\1.\2"),
        Rule(rf"decode_head\.aspp_modules\.(\d+)\.{sep}", r"backbone.aspp.branches.\1.\2.\3.\4"),
        Rule(r"decode_head\.bottleneck\.(conv|bn)\.(\w+)", r"backbone.aspp.bottleneck.\1.\2"),
        Rule(r"decode_head\.c1_bottleneck\.(conv|bn)\.(\w+)", r"decode_head.c1_bottleneck.\1.\2"),
        Rule(rf"decode_head\.sep_bottleneck\.(\d)\.{sep}", r"decode_head.sep_bottleneck.\1.\2.\3.\4"),
        Rule(r"decode_head\.conv_seg\.(weight|bias)", r"decode_head.classifier.\1"),
        Rule(r"auxiliary_head\.convs\.(\d+)\.(conv|bn)\.(\w+)", r"aux_heads.0.convs.\1.\2.\3"),
        Rule(r"auxiliary_head\.conv_cat\.(conv|bn)\.(\w+)", r"aux_heads.0.conv_cat.\1.\2"),
        Rule(r"auxiliary_head\.conv_seg\.(weight|bias)", r"aux_heads.0.classifier.\1"),
    ]

