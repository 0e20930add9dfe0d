"""SegViT's Attention-to-Mask (ATM) decode head (thesis 4.2.1, fig. 4.3, eqs. 4.1-4.5).

One learnable query per class (``class_queries``) attends, stage after stage, to the tokens of
one backbone layer each (deepest first: ViT-B blocks 11, 7, 5). A stage (:class:`ATMStage`) is a
``Linear(C -> D) + LayerNorm(D)`` on its layer's tokens followed by ``num_layers`` post-norm
transformer decoder layers (optional query self-attention, cross-attention, ReLU FFN). The
*mask* of a stage is the similarity map of its last cross-attention before the softmax,
``S = QKᵀ/sqrt(d_k)`` averaged over heads (eq. 4.2), reshaped to ``[B, K, h, w]``. Masks
accumulate as logits over stages (``mask_i = Σ_{j<=i} S_j``), the output queries of a stage are
the input queries of the next, and one shared ``Linear(D, K+1)`` (eq. 4.4) classifies every
stage's queries (K classes + "no object"). Outputs: ``pred_logits [B, K, K+1]`` and
``pred_masks [B, K, h, w]`` of the last stage, and ``aux_outputs`` (earlier stages, for deep
supervision). The loss lives in ``models/atm_criterion.py``.

Decisions (the thesis is silent, or it differs from the released code, zbwxp/SegVit
``decode_heads/atm_head.py``):

* ``in_index`` lists backbone outputs in the order the stages consume them, deepest first.
  With ``out_indices: [5, 7, 11]`` the default ``(2, 1, 0)`` runs stages on blocks 11, 7, 5;
  ``use_stages: 1`` keeps the first entry only (table 4.7's "one stage on block 11"). Negative
  indices count from the end as in Python.
* ``self_attn`` defaults to off (thesis fig. 4.3: removed for speed); the released v1 head keeps
  it (its decoder layers are ``TransformerDecoderLayer``-style, with query self-attention).
* Dropout ``dropout`` (0.1) is applied as in the released head (torch's
  ``TransformerDecoderLayer`` defaults): on the attention weights, after each residual branch and
  inside the FFN.
* Initialisation as released: every ``Linear`` truncated-normal std 0.02 with zero bias,
  LayerNorms 1/0, class queries N(0, 1) (``nn.Embedding``'s default).
* The attention output uses ``F.scaled_dot_product_attention`` in every layer but the last of a
  stage. The last layer also needs the head-averaged logits, so it computes ``QKᵀ`` once with an
  explicit matmul and reuses it for the softmax and the mask. The alternative, SDPA plus a
  second ``QKᵀ`` for the mask, costs one more ``K·N·D`` multiply-add per stage and would no
  longer count what the thesis counts; the wall-clock difference between the two is small
  against the whole head, so fidelity of the count decides.
* Assembling the map (:func:`semantic_scores`): ``mask_resolution="full"`` is the released
  code (upsample the mask logits to the output size, sigmoid, then
  ``einsum('bqc,bqhw->bchw', softmax(cls)[..., :K], masks)`` at full size: K²·H·W multiply-adds).
  ``"low"`` forms the scores at 1/16 and upsamples those. Because bilinear resizing is linear,
  ``"low"`` equals "sigmoid at 1/16, upsample the masks, multiply", which is the order thesis
  eq. 4.3 and the text after it describe (the mask is ``Sigmoid(S)``, *then* reshaped and
  upsampled); it differs from ``"full"`` only in where the sigmoid sits relative to the
  upsampling. Default: ``"low"`` (the thesis' formula, an einsum ~K× smaller). The thesis'
  GFLOPs figures were produced with the released code, so to reproduce them count with
  ``mask_resolution: full`` (``--set model.decode_head.mask_resolution=full``).
* FLOPs are counted by fvcore with the SDPA handle of ``engine/flops.py`` (``segcli eval
  --flops``). MMSegmentation's ``encode_decode`` resizes the ``[1, K, H, W]`` scores to the
  image size even when the sizes already match, and fvcore counts that bilinear resize (4 flops
  per output element); our pipeline does not run it, so thesis totals include a small term that
  ours lack.
* ``key_padding_mask`` (``[B, N]``, True = padding) lets DToP run a stage on per-image token
  subsets padded to a common length; padded tokens get no attention weight, their mask values are
  finite but meaningless. Every image must keep at least one real token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ...configurable import AnyInt, NonNegativeFloat, PositiveInt, UnitFloat
from ...errors import SegcliError
from ...ops.scores import ResizedScores, ScoreMap, UpsampledScores, resize_rows
from ...registry import HEADS
from ..atm_criterion import ATMCriterion
from ..base import DecodeHead, HeadContext, resize
from ..layers import ATMDecoderLayer

HEAD_DIM = 32  # thesis' ViT-B (384/12) and ViT-L (512/16) heads


@dataclass(frozen=True)
class ATMConfig:
    """``decode_head: {type: atm, ...}``; defaults are the thesis' ViT-B setting."""

    in_index: tuple[AnyInt, ...] = (2, 1, 0)  # backbone outputs in stage order, deepest first
    use_stages: PositiveInt | None = None  # keep the first n entries of in_index; None = all
    embed_dim: PositiveInt | None = None  # D; None = C/2 of the first stage's input (384 ViT-B, 512 ViT-L)
    num_heads: PositiveInt | None = None  # None = D / 32 (12 for ViT-B, 16 for ViT-L)
    num_layers: PositiveInt = 3  # decoder layers per stage
    self_attn: bool = False  # query self-attention (thesis: off; released v1: on)
    ffn_ratio: PositiveInt = 4
    dropout: UnitFloat = 0.1
    mask_resolution: Literal["low", "full"] = "low"  # where the class scores are formed (see docstring)
    # "full" only: the released head upsamples masks to its own square img_size, forms the scores
    # there and the segmentor resizes them to the input (zbwxp/SegVit decode_heads/atm_head.py);
    # None = straight to the output size. Equal whenever the window is img_size (slide testing).
    mask_size: PositiveInt | None = None
    # "classes": one Linear(D, K+1) classifies every query over the K classes + "no object" (thesis
    # eq. 4.4); "binary": Linear(D, 2) only says whether query k's class is present, as the released
    # DToP PruneHead (zbwxp/Dynamic-Token-Pruning decode_heads/prune_head.py) does
    class_head: Literal["classes", "binary"] = "classes"
    # false: a stage reads its tokens as they are (already embed_dim wide), with no Linear + LayerNorm
    # (the released Shrunk's ATMSingleHead(use_proj=False) after the TPN queries)
    input_proj: bool = True
    loss_weight: NonNegativeFloat = 1.0
    ce_weight: NonNegativeFloat = 1.0
    focal_weight: NonNegativeFloat = 20.0
    dice_weight: NonNegativeFloat = 1.0
    eos_coef: NonNegativeFloat = 0.1  # CE weight of the "no object" target
    focal_alpha: UnitFloat = 0.25
    focal_gamma: NonNegativeFloat = 2.0
    mask_loss_ignore: Literal["exclude", "negative"] = "negative"  # released code; see atm_criterion.py
    deep_supervision: bool = True  # every stage's (class, cumulative mask) gets the loss

    def __post_init__(self):
        if not self.in_index:
            raise ValueError("in_index must name at least one backbone output")
        if self.use_stages is not None and not 1 <= self.use_stages <= len(self.in_index):
            raise ValueError(f"use_stages must be in 1..{len(self.in_index)} (the length of in_index)")
        if self.num_layers < 1:
            raise ValueError("num_layers must be >= 1")
        if self.embed_dim is not None and self.embed_dim < 1:
            raise ValueError("embed_dim must be >= 1")
        if self.num_heads is not None and self.num_heads < 1:
            raise ValueError("num_heads must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")


# --------------------------------------------------------------------------- building blocks


class ATMStage(nn.Module):
    """One ATM stage: its own token projection + ``num_layers`` decoder layers on one layer's tokens.

    :meth:`forward` works on tokens ``[B, N, C]`` (with an optional ``key_padding_mask`` for
    DToP's variable token sets); :meth:`forward_map` is the thin wrapper for NCHW maps.
    """

    def __init__(self, in_channels: int, dim: int, num_heads: int, num_layers: int = 3, ffn_ratio: int = 4,
                 dropout: float = 0.1, self_attn: bool = False, input_proj: bool = True):
        super().__init__()
        self.proj = nn.Linear(in_channels, dim) if input_proj else nn.Identity()
        self.proj_norm = nn.LayerNorm(dim) if input_proj else nn.Identity()
        self.layers = nn.ModuleList(
            ATMDecoderLayer(dim, num_heads, ffn_ratio, dropout, self_attn) for _ in range(num_layers)
        )

    def forward(
        self, queries: torch.Tensor, tokens: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``queries`` [B, Q, D], ``tokens`` [B, N, C] -> (queries [B, Q, D], mask logits [B, Q, N])."""
        memory = self.proj_norm(self.proj(tokens))  # [B, N, D]
        last = len(self.layers) - 1
        similarity = None
        for i, layer in enumerate(self.layers):
            queries, similarity = layer(queries, memory, key_padding_mask, return_similarity=i == last)
        return queries, similarity

    def forward_map(self, queries: torch.Tensor, feature_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``feature_map`` [B, C, h, w] -> (queries [B, Q, D], mask logits [B, Q, h, w])."""
        batch, _, height, width = feature_map.shape
        tokens = feature_map.flatten(2).transpose(1, 2)  # [B, h*w, C]
        queries, similarity = self(queries, tokens)
        return queries, similarity.view(batch, -1, height, width)  # [B, Q, h, w]


def query_class_probs(class_logits: torch.Tensor) -> torch.Tensor:
    """``P[b, q, c]``, the probability that query q says class c, minus "no object": ``[B, Q, K]``.

    From ``[B, Q, K+1]`` logits (a class head over the classes) or, for a binary head ``[B, K, 2]``
    (query k: "class k present" / "absent"), the diagonal matrix of the "present" probabilities,
    so that every formula over queries (eq. 4.4) gives ``P_k · sigmoid(M_k)`` for class k. With one
    class both readings coincide.
    """
    probs = class_logits.softmax(dim=-1)
    queries = class_logits.shape[1]
    if probs.shape[-1] == 2 and queries != 1:
        return torch.diag_embed(probs[..., 0])  # [B, K, K]
    return probs[..., :-1]  # [B, Q, K]


def semantic_scores(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    size: tuple[int, int],
    resolution: Literal["low", "full"] = "low",
    mask_size: int | None = None,
) -> torch.Tensor:
    """Per-class scores ``[B, K, *size]`` from class logits ``[B, Q, K+1]`` and mask logits ``[B, Q, h, w]``.

    ``O_c = Σ_q P_{q,c} · sigmoid(M_q)`` with ``P = softmax(class_logits)`` minus "no object"
    (thesis eq. 4.4 and the text after it; for ATM Q = K and query k is class k). ``"full"``
    upsamples the mask logits first (released code), ``"low"`` forms the scores at mask
    resolution and upsamples them (see the module docstring).
    """
    probs = query_class_probs(class_logits)  # [B, Q, K]
    if resolution == "full":
        masks = resize(mask_logits, (mask_size, mask_size) if mask_size else size).sigmoid()  # [B, Q, H', W']
        return resize(torch.einsum("bqc,bqhw->bchw", probs, masks), size)  # [B, K, H, W]
    if resolution != "low":
        raise ValueError(f"unknown resolution {resolution!r}")
    return resize(low_resolution_scores(class_logits, mask_logits), size)  # [B, K, H, W]


def low_resolution_scores(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """``"low"`` scores before upsampling: ``[B, K, h, w]`` from ``[B, Q, K+1]`` and ``[B, Q, h, w]``."""
    probs = query_class_probs(class_logits)  # [B, Q, K]
    return torch.einsum("bqc,bqhw->bchw", probs, mask_logits.sigmoid())  # [B, K, h, w]


class MaskAssemblyScores(ScoreMap):
    """:func:`semantic_scores` with ``resolution="full"`` at ``size``, formed by bands of rows: the
    mask logits upsampled, sigmoid and the class einsum, per band."""

    def __init__(self, class_logits: torch.Tensor, mask_logits: torch.Tensor, size: tuple[int, int]):
        self.class_logits, self.mask_logits = class_logits, mask_logits  # [B, Q, K+1], [B, Q, h, w]
        self.probs = query_class_probs(class_logits)  # [B, Q, K]
        self.batch, self.channels = mask_logits.shape[0], self.probs.shape[-1]
        self.size = tuple(size)  # as given: symbolic under torch.export (ScoreMap)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        masks = resize_rows(lambda a, b: self.mask_logits[:, :, a:b], int(self.mask_logits.shape[-2]), self.size,
                            start, stop).sigmoid()  # [B, Q, n, W]
        return torch.einsum("bqc,bqhw->bchw", self.probs, masks)  # [B, K, n, W]

    def full(self) -> torch.Tensor:
        return semantic_scores(self.class_logits, self.mask_logits, self.size, "full")


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------- the head


class ATMHead(DecodeHead):
    """Cascaded ATM stages with shared class queries and class head (thesis fig. 4.3)."""

    output_format = "class_masks"

    def __init__(self, cfg: ATMConfig, ctx: HeadContext):
        super().__init__(ctx)
        num_outputs = len(ctx.in_channels)
        for i in cfg.in_index:
            if not -num_outputs <= i < num_outputs:
                raise SegcliError(f"in_index {i} does not exist: the backbone returns {num_outputs} outputs",
                                  "model.decode_head.in_index",
                                  "list 0-based positions in model.backbone.out_indices, deepest first")
        use = cfg.use_stages or len(cfg.in_index)
        self.in_index = tuple(i % num_outputs for i in cfg.in_index[:use])
        in_channels = [ctx.in_channels[i] for i in self.in_index]
        dim = cfg.embed_dim or in_channels[0] // 2
        heads = cfg.num_heads or max(1, dim // HEAD_DIM)
        if dim % heads:
            raise SegcliError(f"embed_dim {dim} is not divisible by num_heads {heads}", "model.decode_head",
                              "set embed_dim and num_heads so that embed_dim % num_heads == 0")
        self.cfg = cfg
        self.embed_dim = dim
        self.mask_resolution = cfg.mask_resolution
        self.stages = nn.ModuleList(
            ATMStage(c, dim, heads, cfg.num_layers, cfg.ffn_ratio, cfg.dropout, cfg.self_attn, cfg.input_proj)
            for c in in_channels
        )
        self.class_queries = nn.Embedding(ctx.num_classes, dim)  # N(0, 1)
        binary = cfg.class_head == "binary"
        self.class_head = nn.Linear(dim, 2 if binary else ctx.num_classes + 1)  # present/absent, or K + "no object"
        self.apply(_init_weights)
        self.criterion = ATMCriterion(
            ctx.num_classes,
            ignore_index=ctx.ignore_index,
            eos_coef=cfg.eos_coef,
            ce_weight=cfg.ce_weight,
            focal_weight=cfg.focal_weight,
            dice_weight=cfg.dice_weight,
            focal_alpha=cfg.focal_alpha,
            focal_gamma=cfg.focal_gamma,
            mask_loss_ignore=cfg.mask_loss_ignore,
            loss_weight=cfg.loss_weight,
            binary=binary,
        )

    def initial_queries(self, batch: int) -> torch.Tensor:
        """The class queries shared by every image: ``[B, K, D]`` (a view, no copy)."""
        return self.class_queries.weight.unsqueeze(0).expand(batch, -1, -1)

    def forward(self, features: list[torch.Tensor]) -> dict:
        maps = [features[i] for i in self.in_index]  # stage order, deepest first
        queries = self.initial_queries(maps[0].shape[0])  # [B, K, D]
        mask_size = maps[-1].shape[-2:]  # masks are summed on the last stage's grid (all equal for ViTs)
        stage_logits, stage_masks = [], []
        mask = None
        for stage, feature_map in zip(self.stages, maps):
            queries, similarity = stage.forward_map(queries, feature_map)  # [B, K, D], [B, K, h, w]
            similarity = resize(similarity, tuple(mask_size))
            mask = similarity if mask is None else mask + similarity  # cumulative logits
            stage_logits.append(self.class_head(queries))  # [B, K, K+1]
            stage_masks.append(mask)
        outputs = {"pred_logits": stage_logits[-1], "pred_masks": stage_masks[-1]}
        outputs["aux_outputs"] = [
            {"pred_logits": c, "pred_masks": m} for c, m in zip(stage_logits[:-1], stage_masks[:-1])
        ]
        return outputs

    def input_layer(self) -> int | None:
        return self.in_index[0] if len(self.stages) == 1 else None

    @property
    def supports_token_input(self) -> bool:
        """A one-stage head attends to any token set (with a key padding mask)."""
        return len(self.stages) == 1

    def forward_tokens(self, tokens: torch.Tensor, pad_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The one stage on tokens ``[B, M, C]`` -> ``pred_logits`` [B, K, K+1], ``pred_masks`` [B, K, M]
        (padded tokens get no attention weight; their mask values are meaningless)."""
        if not self.supports_token_input:
            return super().forward_tokens(tokens, pad_mask)
        queries = self.initial_queries(tokens.shape[0])  # [B, K, D]
        queries, mask_logits = self.stages[0](queries, tokens, pad_mask)  # [B, K, D], [B, K, M]
        return {"pred_logits": self.class_head(queries), "pred_masks": mask_logits}

    def forward_layerwise(self, features: list[torch.Tensor]) -> dict:
        """A one-stage head as the released ``ATMSingleHead`` (zbwxp/SegVit
        ``decode_heads/atm_single_head.py``): every decoder layer yields its own
        class logits and mask (no summing over layers); the last layer's pair is the prediction,
        the earlier ones are ``aux_outputs`` (computed in training only). Shrunk's
        ``head_mode: released``."""
        if len(self.stages) != 1:
            raise ValueError("forward_layerwise needs a one-stage ATM head (use_stages: 1)")
        feature_map = features[self.in_index[0]]
        batch, _, height, width = feature_map.shape
        stage = self.stages[0]
        memory = stage.proj_norm(stage.proj(feature_map.flatten(2).transpose(1, 2)))  # [B, h*w, D]
        queries = self.initial_queries(batch)  # [B, K, D]
        last = len(stage.layers) - 1
        class_logits, masks = [], []
        for i, layer in enumerate(stage.layers):
            supervised = self.training or i == last
            queries, similarity = layer(queries, memory, return_similarity=supervised)
            if supervised:
                class_logits.append(self.class_head(queries))  # [B, K, K+1]
                masks.append(similarity.view(batch, -1, height, width))  # [B, K, h, w], this layer's own
        aux = [{"pred_logits": c, "pred_masks": m} for c, m in zip(class_logits[:-1], masks[:-1])]
        return {"pred_logits": class_logits[-1], "pred_masks": masks[-1], "aux_outputs": aux}

    def loss(self, outputs: dict, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.cfg.deep_supervision:
            outputs = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        return self.criterion(outputs, labels)

    def score_map(self, outputs: dict, size: tuple[int, int]) -> ScoreMap:
        """``"low"``: the 1/16 scores and their bilinear resize; ``"full"``: the released assembly,
        a band of rows of upsampled masks at a time (:class:`MaskAssemblyScores`)."""
        if self.mask_resolution == "low":
            return UpsampledScores(low_resolution_scores(outputs["pred_logits"], outputs["pred_masks"]), size)
        size = tuple(size)
        mask_size = (self.cfg.mask_size,) * 2 if self.cfg.mask_size else size  # where the released code forms them
        scores = MaskAssemblyScores(outputs["pred_logits"], outputs["pred_masks"], mask_size)
        return scores if mask_size == size else ResizedScores(scores, size)

    def no_weight_decay_names(self) -> set[str]:
        """Parameter names (relative to the head) that take no weight decay: the class queries."""
        return {"class_queries.weight"}


@HEADS.register("atm", ATMConfig)
def build_atm(cfg: ATMConfig, ctx: HeadContext) -> ATMHead:
    return ATMHead(cfg, ctx)
