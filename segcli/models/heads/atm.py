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

Decisions (the thesis and SPEC are silent, or they differ from the released code):

* ``in_index`` lists backbone outputs in the order the stages consume them, deepest first.
  With ``out_indices: [5, 7, 11]`` the default ``(2, 1, 0)`` runs stages on blocks 11, 7, 5;
  ``use_stages: 1`` keeps the first entry only (table 4.7's "one stage on block 11"). Negative
  indices count from the end as in Python.
* ``self_attn`` defaults to off (thesis fig. 4.3: removed for speed); the released v1 head keeps
  it (SPEC).
* Dropout ``dropout`` (0.1) is applied as in the released head (torch's
  ``TransformerDecoderLayer`` defaults): on the attention weights, after each residual branch and
  inside the FFN.
* Initialisation as released: every ``Linear`` truncated-normal std 0.02 with zero bias,
  LayerNorms 1/0, class queries N(0, 1) (``nn.Embedding``'s default).
* The attention output uses ``F.scaled_dot_product_attention`` in every layer but the last of a
  stage. The last layer also needs the head-averaged logits, so it computes ``QKᵀ`` once with an
  explicit matmul and reuses it for the softmax and the mask. The alternative, SDPA plus a
  second ``QKᵀ`` for the mask, costs one more ``K·N·D`` multiply-add per stage (fvcore: +0.18
  GFLOPs for ViT-B at 512²) and would no longer count what the thesis counts. Measured on CPU
  (one thread, B=2, K=150, N=1024, 12 heads; min of 20 runs on a shared machine): explicit
  19.7 ms forward / 41.9 ms forward+backward, SDPA + per-head ``QKᵀ`` 18.2 / 46.1, SDPA + the
  folded ``QKᵀ`` (the head mean equals the full-width product / heads) 11.3 / 38.9: a few ms
  either way, against ~200 ms for the whole head, so fidelity of the count decides.
* Assembling the map (:func:`semantic_scores`): ``mask_resolution="full"`` is the released
  code (upsample the mask logits to the output size, sigmoid, then
  ``einsum('bqc,bqhw->bchw', softmax(cls)[..., :K], masks)`` at full size: K²·H·W multiply-adds,
  5.9 GFLOPs at 512² with K=150). ``"low"`` forms the scores at 1/16 and upsamples those. Because
  bilinear resizing is linear, ``"low"`` equals "sigmoid at 1/16, upsample the masks, multiply",
  which is the order thesis eq. 4.3 and the text after it describe (the mask is
  ``Sigmoid(S)``, *then* reshaped and upsampled); it differs from ``"full"`` only in where the
  sigmoid sits relative to the upsampling. Default: ``"low"`` (the thesis' formula, ~K× cheaper
  einsum). The thesis' GFLOPs figures were produced with the released code, so to reproduce them
  count with ``mask_resolution: full`` (``--set model.decode_head.mask_resolution=full``).
* FLOPs (fvcore + the SDPA handle of ``engine/flops.py``, head alone on ViT-shaped maps, K=150,
  self-attention off unless said): ViT-B 512² ``full`` 12.75 (self-attn on 13.71, one stage on
  block 11 8.30), ``low`` 6.88; ViT-L 640² ``full`` 25.31 (on 26.94), ``low`` 16.13. With the
  backbones of SPEC (107.00 / 610.66) the ``full`` totals are the thesis' totals minus 0.16 / 0.25:
  MMSegmentation's ``encode_decode`` resizes the [1, K, H, W] scores to the image size even when
  the sizes already match, and fvcore counts that bilinear resize at 4 flops per output element.
  So thesis 120.87 (ViT-B, self-attn on) = 107.00 + 13.71 + 0.16, 119.91 (off) = 107.00 + 12.75 +
  0.16, 637.85 (ViT-L, on) = 610.66 + 26.94 + 0.25, and table 4.7's one-stage 115.8 = 107.00 +
  8.30 + 0.32 (one stage of self-attention) + 0.16: that row had query self-attention.
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

from ...errors import SegcliError
from ...registry import HEADS
from ..atm_criterion import ATMCriterion
from ..base import DecodeHead, HeadContext, resize

HEAD_DIM = 32  # thesis' ViT-B (384/12) and ViT-L (512/16) heads


@dataclass(frozen=True)
class ATMConfig:
    """``decode_head: {type: atm, ...}``; defaults are the thesis' ViT-B setting."""

    in_index: tuple[int, ...] = (2, 1, 0)  # backbone outputs in stage order, deepest first
    use_stages: int | None = None  # keep the first n entries of in_index; None = all
    embed_dim: int | None = None  # D; None = C/2 of the first stage's input (384 ViT-B, 512 ViT-L)
    num_heads: int | None = None  # None = D / 32 (12 for ViT-B, 16 for ViT-L)
    num_layers: int = 3  # decoder layers per stage
    self_attn: bool = False  # query self-attention (thesis: off; released v1: on)
    ffn_ratio: int = 4
    dropout: float = 0.1
    mask_resolution: Literal["low", "full"] = "low"  # where the class scores are formed (see docstring)
    loss_weight: float = 1.0
    ce_weight: float = 1.0
    focal_weight: float = 20.0
    dice_weight: float = 1.0
    eos_coef: float = 0.1  # CE weight of the "no object" target
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    mask_loss_ignore: Literal["exclude", "negative"] = "exclude"  # released code: "negative"
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


class MaskAttention(nn.Module):
    """Multi-head attention from ``queries`` to ``tokens`` (eqs. 4.1-4.2) with separate q/k/v
    projections (with bias) and an output projection; optionally also returns the similarity
    map ``QKᵀ/sqrt(d)`` averaged over heads, the ATM mask logits."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # [B, h, L, d]

    def forward(
        self,
        queries: torch.Tensor,
        tokens: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        return_similarity: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``queries`` [B, Q, D], ``tokens`` [B, N, D] -> (output [B, Q, D], similarity [B, Q, N] or None)."""
        q = self._heads(self.q_proj(queries))  # [B, h, Q, d]
        k = self._heads(self.k_proj(tokens))  # [B, h, N, d]
        v = self._heads(self.v_proj(tokens))  # [B, h, N, d]
        dropout = self.dropout if self.training else 0.0
        similarity = None
        if return_similarity:
            logits = torch.matmul(q * self.head_dim ** -0.5, k.transpose(-2, -1))  # [B, h, Q, N]
            similarity = logits.mean(dim=1)  # [B, Q, N]
            if key_padding_mask is not None:
                logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
            weights = F.dropout(logits.softmax(dim=-1), dropout, self.training)
            out = torch.matmul(weights, v)  # [B, h, Q, d]
        else:
            attn_mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]  # [B, 1, 1, N]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)  # [B, h, Q, d]
        out = out.transpose(1, 2).flatten(2)  # [B, Q, D]
        return self.out_proj(out), similarity


class ATMDecoderLayer(nn.Module):
    """Post-norm decoder layer: (query self-attention) -> cross-attention -> ReLU FFN."""

    def __init__(self, dim: int, num_heads: int, ffn_ratio: int = 4, dropout: float = 0.1, self_attn: bool = False):
        super().__init__()
        self.self_attn = MaskAttention(dim, num_heads, dropout) if self_attn else None
        self.self_norm = nn.LayerNorm(dim) if self_attn else None
        self.cross_attn = MaskAttention(dim, num_heads, dropout)
        self.cross_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_ratio * dim), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ffn_ratio * dim, dim)
        )
        self.ffn_norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        queries: torch.Tensor,
        tokens: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        return_similarity: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``queries`` [B, Q, D], ``tokens`` [B, N, D] -> (queries [B, Q, D], similarity [B, Q, N] or None)."""
        if self.self_attn is not None:
            update, _ = self.self_attn(queries, queries)
            queries = self.self_norm(queries + self.drop(update))
        update, similarity = self.cross_attn(queries, tokens, key_padding_mask, return_similarity)
        queries = self.cross_norm(queries + self.drop(update))
        queries = self.ffn_norm(queries + self.drop(self.ffn(queries)))
        return queries, similarity


class ATMStage(nn.Module):
    """One ATM stage: its own token projection + ``num_layers`` decoder layers on one layer's tokens.

    :meth:`forward` works on tokens ``[B, N, C]`` (with an optional ``key_padding_mask`` for
    DToP's variable token sets); :meth:`forward_map` is the thin wrapper for NCHW maps.
    """

    def __init__(self, in_channels: int, dim: int, num_heads: int, num_layers: int = 3, ffn_ratio: int = 4,
                 dropout: float = 0.1, self_attn: bool = False):
        super().__init__()
        self.proj = nn.Linear(in_channels, dim)
        self.proj_norm = nn.LayerNorm(dim)
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


def semantic_scores(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    size: tuple[int, int],
    resolution: Literal["low", "full"] = "low",
) -> torch.Tensor:
    """Per-class scores ``[B, K, *size]`` from class logits ``[B, Q, K+1]`` and mask logits ``[B, Q, h, w]``.

    ``O_c = Σ_q P_{q,c} · sigmoid(M_q)`` with ``P = softmax(class_logits)`` minus "no object"
    (thesis eq. 4.4 and the text after it; for ATM Q = K and query k is class k). ``"full"``
    upsamples the mask logits first (released code), ``"low"`` forms the scores at mask
    resolution and upsamples them (see the module docstring).
    """
    probs = class_logits.softmax(dim=-1)[..., :-1]  # [B, Q, K]
    if resolution == "full":
        masks = resize(mask_logits, size).sigmoid()  # [B, Q, H, W]
        return torch.einsum("bqc,bqhw->bchw", probs, masks)  # [B, K, H, W]
    if resolution != "low":
        raise ValueError(f"unknown resolution {resolution!r}")
    scores = torch.einsum("bqc,bqhw->bchw", probs, mask_logits.sigmoid())  # [B, K, h, w]
    return resize(scores, size)  # [B, K, H, W]


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------- the head


class ATMHead(DecodeHead):
    """Cascaded ATM stages with shared class queries and class head (thesis fig. 4.3)."""

    def __init__(self, cfg: ATMConfig, ctx: HeadContext):
        super().__init__()
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
        self.num_classes = ctx.num_classes
        self.embed_dim = dim
        self.mask_resolution = cfg.mask_resolution
        self.stages = nn.ModuleList(
            ATMStage(c, dim, heads, cfg.num_layers, cfg.ffn_ratio, cfg.dropout, cfg.self_attn) for c in in_channels
        )
        self.class_queries = nn.Embedding(ctx.num_classes, dim)  # N(0, 1)
        self.class_head = nn.Linear(dim, ctx.num_classes + 1)  # K classes + "no object"
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

    def loss(self, outputs: dict, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.cfg.deep_supervision:
            outputs = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        return self.criterion(outputs, labels)

    def seg_logits(self, outputs: dict, size: tuple[int, int]) -> torch.Tensor:
        return semantic_scores(outputs["pred_logits"], outputs["pred_masks"], tuple(size), self.mask_resolution)

    def no_weight_decay_names(self) -> set[str]:
        """Parameter names (relative to the head) that take no weight decay: the class queries."""
        return {"class_queries.weight"}


@HEADS.register("atm", ATMConfig)
def build_atm(cfg: ATMConfig, ctx: HeadContext) -> ATMHead:
    return ATMHead(cfg, ctx)
