"""Key maps of the official SegViT (zbwxp/SegVit, MMSegmentation 0.24) checkpoints.

The released v1 model is MMSegmentation's ``VisionTransformer`` (``with_cls_token=False``, no
final norm) + ``decode_heads/atm_head.py``'s ``ATMHead``. Its decoder layers are post-norm
``TransformerDecoderLayer`` s (:func:`decoder_layer_rules`). ``input_proj_{s}`` / ``proj_norm_{s}`` / ``decoder_{s}`` is stage ``s`` (1 = the deepest
layer), which is segcli's ``stages.{s-1}`` with ``in_index`` deepest first.
"""
from __future__ import annotations

import re

from ..models.backbones.weights import MMSEG_VIT_RENAMES
from .keymap import Rule

_P = r"(?P<p>weight|bias)"


def decoder_layer_rules(layer: str, out: str, cross_attention: str = "separate") -> list[Rule]:
    """One post-norm decoder layer of the official heads -> segcli's ``ATMDecoderLayer``.

    ``layer`` matches the layer's key prefix, ``out`` is its segcli prefix (it may use the prefix's
    named groups). Query self-attention is a fused ``nn.MultiheadAttention`` (``in_proj`` = q, k, v
    stacked); cross-attention is the ATM heads' separate ``q/k/v/proj`` linears (``"separate"``)
    or a second ``nn.MultiheadAttention`` (``"fused"``, the Shrunk TPN's ``nn.TransformerDecoder``).
    ``norm1/2/3`` follow self-attention, cross-attention and the FFN.
    """
    qkv = lambda attn: tuple(out + rf"{attn}.{x}_proj.\g<p>" for x in "qkv")  # noqa: E731
    if cross_attention == "separate":
        cross = [Rule(layer + rf"multihead_attn\.(?P<x>q|k|v)\.{_P}", out + r"cross_attn.\g<x>_proj.\g<p>"),
                 Rule(layer + rf"multihead_attn\.proj\.{_P}", out + r"cross_attn.out_proj.\g<p>")]
    else:
        cross = [Rule(layer + rf"multihead_attn\.in_proj_{_P}", None, split=qkv("cross_attn")),
                 Rule(layer + rf"multihead_attn\.out_proj\.{_P}", out + r"cross_attn.out_proj.\g<p>")]
    return [
        Rule(layer + rf"self_attn\.in_proj_{_P}", None, split=qkv("self_attn")),
        Rule(layer + rf"self_attn\.out_proj\.{_P}", out + r"self_attn.out_proj.\g<p>"),
        *cross,
        Rule(layer + rf"linear1\.{_P}", out + r"ffn.0.\g<p>"),
        Rule(layer + rf"linear2\.{_P}", out + r"ffn.3.\g<p>"),
        Rule(layer + rf"norm1\.{_P}", out + r"self_norm.\g<p>"),
        Rule(layer + rf"norm2\.{_P}", out + r"cross_norm.\g<p>"),
        Rule(layer + rf"norm3\.{_P}", out + r"ffn_norm.\g<p>"),
    ]


def mmseg_vit_rules(source_prefix: str = r"backbone\.", target_prefix: str = "backbone.vit.",
                    final_norm: bool = False) -> list[Rule]:
    """MMSegmentation ``VisionTransformer`` -> segcli's timm ViT (``backbone.vit.*``).

    segcli's ViT has no cls token (its features are patch tokens only; the released models use
    ``with_cls_token=False``) and no final norm on the features (``final_norm=False``): both are
    dropped unless ``final_norm`` (a backbone file keeps its final norm as timm's ``norm``).
    """
    rules = [Rule(rf"{source_prefix}cls_token", None)]
    for pattern, target in MMSEG_VIT_RENAMES:
        if pattern.startswith("ln1") and not final_norm:
            rules.append(Rule(source_prefix + pattern, None))
        elif not pattern.startswith("(pos_embed"):
            rules.append(Rule(source_prefix + pattern, target_prefix + target))
    return rules + [Rule(rf"{source_prefix}pos_embed", target_prefix + "pos_embed")]


def atm_head_rules(head: str = "", target: str = "decode_head.") -> list[Rule]:
    """The official ``ATMHead`` under ``decode_head.{head}`` -> segcli's ATM head under ``target``.

    Stage numbers keep the official 1-based number in a ``stages.@N`` placeholder, which
    :func:`zero_based_stages` renames afterwards (a regular expression cannot subtract).
    """
    return [
        Rule(rf"decode_head\.{head}loss_decode\..*", None),  # the criterion's class weights: not learnt
        Rule(rf"decode_head\.{head}input_proj_(\d+)\.(weight|bias)", target + r"stages.@\1.proj.\2"),
        Rule(rf"decode_head\.{head}proj_norm_(\d+)\.(weight|bias)", target + r"stages.@\1.proj_norm.\2"),
        *decoder_layer_rules(rf"decode_head\.{head}decoder_(?P<s>\d+)\.layers\.(?P<l>\d+)\.",
                             target + r"stages.@\g<s>.layers.\g<l>."),
        Rule(rf"decode_head\.{head}q\.weight", target + "class_queries.weight"),
        Rule(rf"decode_head\.{head}class_embed\.(weight|bias)", target + r"class_head.\1"),
    ]


_STAGE = re.compile(r"(stages|readers)\.@(\d+)\.")


def zero_based_stages(key: str) -> str:
    """``stages.@N.`` / ``readers.@N.`` placeholders -> ``...{N-1}.`` (official stages count from 1)."""
    return _STAGE.sub(lambda m: f"{m.group(1)}.{int(m.group(2)) - 1}.", key)


def segvit_v1_rules() -> list[Rule]:
    """The released SegViT v1 (ViT + ATM head); apply with ``rename=zero_based_stages``."""
    return mmseg_vit_rules() + atm_head_rules()


def prune_head_rules() -> list[Rule]:
    """The released DToP ``PruneHead`` s (one stage each: ``input_proj``, ``proj_norm``,
    ``decoder.layers``, ``q``, a binary ``class_embed``) -> one-stage ATM heads; the head's name is
    an ``@...@`` placeholder that :func:`~segcli.convert.keymap.segcli_head_names` turns into segcli's
    (``aux_heads.{i}``)."""
    head = r"(?P<h>decode_head|auxiliary_head\.\d+)"
    return [
        Rule(head + r"\.loss_decode\..*", None),  # the criterion's class weights: not learnt
        Rule(head + rf"\.input_proj\.{_P}", r"@\g<h>@.stages.0.proj.\g<p>"),
        Rule(head + rf"\.proj_norm\.{_P}", r"@\g<h>@.stages.0.proj_norm.\g<p>"),
        *decoder_layer_rules(head + r"\.decoder\.layers\.(?P<l>\d+)\.", r"@\g<h>@.stages.0.layers.\g<l>."),
        Rule(head + r"\.q\.weight", r"@\g<h>@.class_queries.weight"),
        Rule(head + r"\.class_embed\.(?P<p>weight|bias)", r"@\g<h>@.class_head.\g<p>"),
    ]


def dtop_rules() -> list[Rule]:
    """A model trained with zbwxp/Dynamic-Token-Pruning: MMSegmentation's ViT + ``PruneHead`` s;
    apply with ``rename=segcli_head_names``."""
    return mmseg_vit_rules() + prune_head_rules()


def tpn_rules() -> list[Rule]:
    """The released Shrunk's TPN query upsampler (``decode_heads/tpn_atm_head.py``) -> segcli's
    learned QU (``qu.*``): ``input_proj_{s}`` / ``proj_norm_{s}`` / ``decoder_{s}`` (plain
    ``nn.TransformerDecoder`` layers: fused ``in_proj`` in both attentions) are reader ``s-1``,
    ``q`` the learnt query grid."""
    return [
        Rule(r"decode_head\.loss_decode\..*", None),  # the criterion's class weights: not learnt
        Rule(r"decode_head\.input_proj_(\d+)\.(weight|bias)", r"qu.readers.@\1.proj.\2"),
        Rule(r"decode_head\.proj_norm_(\d+)\.(weight|bias)", r"qu.readers.@\1.norm.\2"),
        *decoder_layer_rules(r"decode_head\.decoder_(?P<s>\d+)\.layers\.(?P<l>\d+)\.",
                             r"qu.readers.@\g<s>.layers.\g<l>.", cross_attention="fused"),
        Rule(r"decode_head\.q\.weight", "qu.grid_queries.weight"),
    ]


def segvit_v1_shrunk_rules() -> list[Rule]:
    """The released Shrunk SegViT (``backbone/vit_shrink.py`` + ``TPNATMHead``): the ViT (QD adds
    no tensor), the TPN as segcli's learned QU, its ``atm`` (an ``ATMSingleHead`` without input
    projection) as the one-stage ATM decode head; apply with ``rename=zero_based_stages``."""
    return mmseg_vit_rules() + atm_head_rules(head=r"atm\.") + tpn_rules()
