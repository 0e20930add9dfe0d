"""Shrunk SegViT: query downsampling (QD / EQD) inside the plain ViT, query upsampling (QU) after it.

Thesis 4.2.2 (figs. 4.4, 4.5), table 4.7. A segmentor (``model.type: shrunk``)
that runs the ViT backbone block by block through its block-level API and hands the decode head
the usual feature maps:

* **QD** (block ``qd_index``, 0-based): the block's queries are the top-left token of every 2x2
  cell of the 1/16 grid (``[::2, ::2]``, a ``ceil(h/2) x ceil(w/2)`` grid for odd sizes too); keys
  and values stay full resolution and the residual is taken from the subsampled tokens
  (``run_block(..., query_index=...)``), so the pretrained block is used unchanged (table 4.9:
  why QD beats a strided conv). Blocks after it run on the 1/32 token set. ``qd_index: 0`` is
  the thesis' "QD before the first transformer layer": block 0 is the QD block.
* **EQD** (``edge: true``): QD whose queries are the subsample *plus* every token that contains
  an edge, predicted by :class:`~segcli.models.heads.edge.EdgeHead` on the patch embeddings
  (softmax, p(edge) > ``edge_threshold`` = 0.7). Token counts differ per image: the kept tokens
  are packed per image with :func:`~segcli.models.tokens.select_tokens` (shared with DToP),
  padded to the batch maximum, and later blocks get ``key_padding_mask`` and their tokens' grid
  ``positions`` (BEiT's relative position bias keeps the true 1/16 geometry). The edge loss
  (``edge.loss_edge``) trains the branch against "this patch holds two or more classes".
* **QU** (``qu``): 1/16 queries cross-attend to the shrunk tokens and return a 1/16 map with the
  backbone's C channels, which replaces the deepest backbone output, so the *normal* decode head
  reads restored 1/16 features (the thesis' pipeline: "ATM on the restored features").
  ``inherit`` (our reading of thesis fig. 4.4, the default): the queries are the 1/16 tokens kept
  from just before QD (projected to D), refined by one decoder reading the final tokens. ``learned``
  (released code and the thesis' own 4.2.2 paragraph): a learnable ``(H/16)(W/16) x D`` grid of
  queries, one decoder reading the last 1/16 block before QD (the embeddings when
  ``qd_index: 0``), a second one reading the final block. ``none``: no QU (table 4.7's
  "Plain + QD" row; the head then reads 1/32 maps; not with EQD). A decoder is ``qu_layers``
  post-norm layers of :class:`~segcli.models.layers.ATMDecoderLayer` (query self-attention as
  released, ``qu_self_attn``; cross-attention; ReLU FFN 4D; dropout 0.1) behind its own
  ``Linear(C, D) + LayerNorm`` of the memory tokens. D = ``qu_dim`` (default C/2, heads of 32).

Decisions (the thesis is silent, or the released code, zbwxp/SegVit ``backbone/vit_shrink.py``
and ``decode_heads/tpn_atm_head.py``, differs):

* **QU width and output.** QU works at the head's width D = C/2 as released, then
  ``Linear(D, C)`` back to C so that any decode head reads it unchanged. The released head skips
  its own C->D projection instead (``use_proj=False``); ours keeps it: two extra projections of
  the 1/16 tokens, in exchange for heads that know nothing of Shrunk.
* **QU skip** (``qu_skip: true``, off by default: not in the thesis nor the released code): the
  shrunk tokens, put back on the 1/16 grid by nearest neighbour (``nearest_grid``), are added to
  the QU output, so the restored map starts from the deep features instead of having to rebuild
  them through cross-attention alone (offered because on the tiny recipes, trained from
  scratch, QD + QU scored below QD with no QU at all; ``benchmarks/tiny_compare.py`` re-measures
  it).
* **Released ATM after QU** (``head_mode: released``, zbwxp/SegVit
  ``decode_heads/atm_single_head.py``, run by ``ATMHead.forward_layerwise``): one ATM stage whose
  every decoder layer yields its own class logits and mask (no summing over layers), the last
  layer's pair being the prediction and every earlier layer's pair deep-supervised with the same
  ATM loss. Needs a one-stage ATM head (``use_stages: 1``; the released layer has query self-attention:
  ``self_attn: true``). ``thesis`` (default) just calls the decode head.
* **Which tokens EQD keeps while training**: the predicted edges, as at test time
  (``edge_keep_train: predicted``; the branch learns from step one, so early on QD is plain 2x2);
  ``target`` keeps the ground-truth edge tokens instead (teacher forcing). The edge loss reaches
  the patch embedding too (the thesis trains both "simultaneously" and stops no gradient).
* **Outputs after QD.** ``out_indices`` before ``qd_index`` give 1/16 maps; the deepest index
  gives the QU map; indices in between give 1/32 maps (QD only; with EQD they are ragged token
  sets, which no head reads, so a recipe asking for them is rejected).
* **Statistics.** The score map of :meth:`ShrunkSegmentor.forward_scores` carries token counts
  (``ops/scores.py``): ``kept`` (queries after QD), ``edges`` (EQD's predicted edge tokens) and
  ``tokens`` (at 1/16); ``eval`` sums them over windows, views, images and processes and reports
  ``kept_fraction`` and ``edge_fraction``.

FLOPs: table 4.7's rows count ``mask_resolution: full`` and one ATM stage with query
self-attention; ``benchmarks/shrunk_speed.py`` counts (fvcore + the SDPA handle) and times the
plain model and the Shrunk variants that way. The released structure (no ``Linear(D, C)`` after
QU, no head projection) is what table 4.7's QD@6 row counts; EQD's cost depends on the share of
tokens kept, which the benchmark sets with a stand-in edge head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..configurable import NonNegativeFloat, NonNegativeInt, PositiveInt, UnitFloat
from ..errors import SegcliError
from ..ops.scores import ScoreMap
from ..registry import SEGMENTORS
from .heads.atm import ATMHead
from .heads.edge import EdgeHead, edge_loss, edge_targets
from .layers import ATMDecoderLayer
from .exportable import ExportSupport, data_dependent
from .segmentor import EncoderDecoder
from .tokens import scatter_tokens, select_tokens

HEAD_DIM = 32  # QU attention heads of 32 channels, as the ATM decoder's


@dataclass(frozen=True)
class ShrunkOptions:
    """``model.options`` of ``type: shrunk`` (see the module docstring)."""

    qd_index: NonNegativeInt = 8  # the block that does QD (0 = the first block)
    qu: Literal["inherit", "learned", "none"] = "inherit"
    qu_layers: PositiveInt = 3
    qu_self_attn: bool = True
    qu_dim: PositiveInt | None = None  # None = C/2
    qu_heads: PositiveInt | None = None  # None = qu_dim / 32
    qu_dropout: UnitFloat = 0.1
    qu_skip: bool = False  # add the shrunk tokens, nearest-upsampled, to the QU output (not in the thesis)
    edge: bool = False  # EQD
    edge_threshold: UnitFloat = 0.7
    edge_hidden: tuple[PositiveInt, ...] | None = None  # None = (C, C/2): three linear layers
    edge_loss_weight: NonNegativeFloat = 1.0
    edge_keep_train: Literal["predicted", "target"] = "predicted"
    head_mode: Literal["thesis", "released"] = "thesis"
    # the released TPN head (zbwxp/SegVit decode_heads/tpn_atm_head.py) keeps its learnt query grid
    # at the size it was built for whatever the input (qu_resize: false; for windows of img_size,
    # as released testing uses, both agree) and hands its queries to the ATM head without a
    # projection back to C (qu_out_proj: false, with the ATM head's input_proj: false)
    qu_resize: bool = True
    qu_out_proj: bool = True

    def __post_init__(self):
        if self.qd_index < 0:
            raise ValueError("qd_index must be >= 0")
        if self.qu_layers < 1:
            raise ValueError("qu_layers must be >= 1")
        if not 0.0 < self.edge_threshold < 1.0:
            raise ValueError("edge_threshold must be in (0, 1)")
        if self.edge and self.qu == "none":
            raise ValueError("EQD needs QU: the kept tokens are no grid a head could read (qu: inherit or learned)")


# --------------------------------------------------------------------------- QD helpers


def subsample_mask(grid: tuple[int, int], device=None) -> torch.Tensor:
    """``[h*w]`` bool: the top-left token of every 2x2 cell (``[::2, ::2]``) of ``grid``."""
    rows = torch.arange(grid[0], device=device) % 2 == 0
    cols = torch.arange(grid[1], device=device) % 2 == 0
    return (rows[:, None] & cols[None, :]).flatten()  # [h*w]


def subsample_index(grid: tuple[int, int], device=None) -> torch.Tensor:
    """``[ceil(h/2)*ceil(w/2)]`` positions of :func:`subsample_mask`'s tokens, in order. Built from
    ``arange`` rather than ``mask.nonzero()`` so its size is known from the grid alone, which lets
    torch.export / ONNX trace QD without a data-dependent shape."""
    rows = torch.arange(0, grid[0], 2, device=device)  # [ceil(h/2)]
    cols = torch.arange(0, grid[1], 2, device=device)  # [ceil(w/2)]
    return (rows[:, None] * grid[1] + cols[None, :]).flatten()  # [ceil(h/2)*ceil(w/2)]


def nearest_grid(tokens: torch.Tensor, index: torch.Tensor, pad_mask: torch.Tensor | None, keep: torch.Tensor,
                 grid: tuple[int, int]) -> torch.Tensor:
    """Shrunk tokens back on the full grid, nearest: ``tokens`` [B, M, C] at positions ``index``
    [B, M] -> [B, h*w, C]. A position that stayed a query (``keep`` [B, N]) gets its own token,
    every other one the token of its 2x2 cell (the cell's top-left is always kept)."""
    batch, num = keep.shape
    pad = pad_mask if pad_mask is not None else torch.zeros_like(index, dtype=torch.bool)
    full = scatter_tokens(tokens.new_zeros(batch, num, tokens.shape[-1]), tokens, index, pad)  # [B, N, C]
    position = torch.arange(num, device=tokens.device)
    cell = (position // grid[1]) // 2 * 2 * grid[1] + (position % grid[1]) // 2 * 2  # [N] top-left of the cell
    from_cell = full[:, cell]  # [B, N, C]
    return torch.where(keep[..., None], full, from_cell)


def shrunk_grid(grid: tuple[int, int]) -> tuple[int, int]:
    """The token grid after QD: ``ceil(h/2) x ceil(w/2)``."""
    return (grid[0] + 1) // 2, (grid[1] + 1) // 2


# --------------------------------------------------------------------------- QU


class TokenReader(nn.Module):
    """``Linear(C, D) + LayerNorm`` on memory tokens, then decoder layers that update the queries."""

    def __init__(self, in_dim: int, dim: int, num_heads: int, num_layers: int, self_attn: bool, dropout: float):
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(ATMDecoderLayer(dim, num_heads, 4, dropout, self_attn) for _ in range(num_layers))

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor, key_padding_mask: torch.Tensor | None = None):
        """``queries`` [B, Q, D], ``tokens`` [B, N, C] -> queries [B, Q, D]."""
        memory = self.norm(self.proj(tokens))  # [B, N, D]
        for layer in self.layers:
            queries, _ = layer(queries, memory, key_padding_mask)
        return queries


class QueryUpsampler(nn.Module):
    """QU: 1/16 queries read the shrunk tokens; returns 1/16 tokens with C channels (module docstring)."""

    def __init__(self, mode: str, in_dim: int, dim: int, num_layers: int, self_attn: bool, dropout: float,
                 base_grid: tuple[int, int], resize: bool = True, out_proj: bool = True, heads: int | None = None):
        super().__init__()
        heads = heads or max(1, dim // HEAD_DIM)
        if dim % heads:
            raise SegcliError(f"qu_dim {dim} does not split into heads of {HEAD_DIM}", "model.options.qu_dim",
                              f"use a multiple of {HEAD_DIM}")
        self.mode = mode
        self.base_grid = tuple(base_grid)
        self.resize = resize or mode != "learned"
        if mode == "learned":
            self.grid_queries = nn.Embedding(base_grid[0] * base_grid[1], dim)  # N(0, 1), as released
            self.readers = nn.ModuleList(
                TokenReader(in_dim, dim, heads, num_layers, self_attn, dropout) for _ in range(2))
        else:
            self.query_proj = nn.Linear(in_dim, dim)
            self.query_norm = nn.LayerNorm(dim)
            self.readers = nn.ModuleList([TokenReader(in_dim, dim, heads, num_layers, self_attn, dropout)])
        self.out_proj = nn.Linear(dim, in_dim) if out_proj else nn.Identity()
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def initial_queries(self, pre_qd: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``[B, h*w, D]``: the learnt grid (resized to ``grid`` if needed) or the projected pre-QD tokens."""
        if self.mode != "learned":
            return self.query_norm(self.query_proj(pre_qd))
        queries = self.grid_queries.weight  # [h0*w0, D]
        if self.resize and tuple(grid) != self.base_grid:
            queries = queries.t().reshape(1, -1, *self.base_grid)  # [1, D, h0, w0]
            queries = F.interpolate(queries, size=tuple(grid), mode="bilinear", align_corners=False)
            queries = queries.flatten(2)[0].t()  # [h*w, D]
        return queries.unsqueeze(0).expand(pre_qd.shape[0], -1, -1)

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        """The grid of the restored tokens: the input's 1/16 grid, or the learnt one when not resized."""
        return tuple(grid) if self.resize else self.base_grid

    def forward(self, pre_qd: torch.Tensor, final: torch.Tensor, grid: tuple[int, int],
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``pre_qd`` [B, h*w, C] (1/16, before QD), ``final`` [B, M, C] (shrunk) -> [B, h*w, C]."""
        queries = self.initial_queries(pre_qd, grid)  # [B, h*w, D]
        if self.mode == "learned":
            queries = self.readers[0](queries, pre_qd)
        queries = self.readers[-1](queries, final, key_padding_mask)
        return self.out_proj(queries)  # [B, h*w, C]

    def no_weight_decay_names(self) -> set[str]:
        return {"grid_queries.weight"} if self.mode == "learned" else set()


# --------------------------------------------------------------------------- the segmentor


class ShrunkSegmentor(EncoderDecoder):
    """ViT backbone with QD/EQD + QU, then the recipe's decode head (thesis fig. 4.4/4.5)."""

    compilable_parts = ("decode_head",)  # the encoder runs block by block (QD, QU), never backbone.forward

    def __init__(self, options: ShrunkOptions, backbone, decode_head, aux_heads=()):
        super().__init__(backbone, decode_head, aux_heads)
        for name in ("embed", "run_block", "tokens_to_map"):
            if not hasattr(backbone, name):
                raise SegcliError("Shrunk needs a plain ViT backbone with block-level access", "model.backbone.type",
                                  "use type: vit")
        depth = backbone.depth
        deepest = max(backbone.out_indices)
        if not 0 <= options.qd_index <= deepest:
            raise SegcliError(f"qd_index {options.qd_index} is not before the deepest output block {deepest}",
                              "model.options.qd_index", f"pick a block in 0..{min(deepest, depth - 1)}")
        between = [i for i in backbone.out_indices if options.qd_index <= i < deepest]
        if between and options.edge:
            raise SegcliError(f"blocks {between} run after EQD on ragged token sets; no head can read them",
                              "model.backbone.out_indices", f"use blocks before {options.qd_index} or the last one")
        # a true type requirement: the released mode is the ATM head's own layer-wise forward
        if options.head_mode == "released" and not (isinstance(decode_head, ATMHead) and len(decode_head.stages) == 1):
            raise SegcliError("head_mode 'released' needs a one-stage ATM decode head", "model.decode_head",
                              "set type: atm and use_stages: 1 (self_attn: true as released)")
        self.options = options
        channels = backbone.embed_dim
        self.qu = None
        if options.qu != "none":
            self.qu = QueryUpsampler(options.qu, channels, options.qu_dim or channels // 2, options.qu_layers,
                                     options.qu_self_attn, options.qu_dropout, backbone.base_grid,
                                     resize=options.qu_resize, out_proj=options.qu_out_proj, heads=options.qu_heads)
        self.edge_head = EdgeHead(channels, options.edge_hidden) if options.edge else None
        self.ignore_index = decode_head.ignore_index  # the edge targets' too

    def export_support(self) -> ExportSupport:
        """QD keeps a fixed 2x2 subsample (a grid-sized token set); EQD adds the tokens its edge
        head finds, which depend on the image."""
        if self.edge_head is not None:
            return data_dependent("Shrunk with EQD", "model.options.edge",
                                  "export a Shrunk model with QD (edge: false); see README Deploy")
        return super().export_support()

    # ------------------------------------------------------------------ encoder
    def keep_mask(self, grid: tuple[int, int], edge_logits: torch.Tensor | None,
                  targets: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        """``[B, h*w]`` bool: the tokens that stay queries in the QD block (2x2 subsample, + edges for EQD)."""
        keep = subsample_mask(grid, device).expand(batch, -1)  # [B, N]
        if edge_logits is None:
            return keep
        if self.training and self.options.edge_keep_train == "target" and targets is not None:
            edges = targets.flatten(1) == 1  # [B, N]
        else:
            edges = EdgeHead.edge_probability(edge_logits.detach()) > self.options.edge_threshold  # [B, N]
        return keep | edges

    def encode(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        """Features for the heads (one per ``backbone.out_indices``) and a dict of EQD extras."""
        backbone = self.backbone
        qd_index = self.options.qd_index
        tokens, grid = backbone.embed(images)  # [B, N, C], (h, w)
        batch = tokens.shape[0]
        wanted = set(backbone.out_indices)
        deepest = max(backbone.out_indices)
        saved: dict[int, torch.Tensor] = {}
        extras: dict[str, torch.Tensor] = {}
        if self.edge_head is not None:
            extras["edge_logits"] = self.edge_head(tokens)  # [B, N, 2], on the patch embeddings
            if labels is not None:
                extras["edge_targets"] = edge_targets(labels, backbone.patch_size, grid, self.ignore_index)  # [B, h, w]
        for i in range(qd_index):
            tokens = backbone.run_block(i, tokens, grid)
            if i in wanted:
                saved[i] = backbone.tokens_to_map(tokens, grid)  # [B, C, h, w]
        pre_qd = tokens  # [B, N, C], the last 1/16 tokens

        keep = self.keep_mask(grid, extras.get("edge_logits"), extras.get("edge_targets"), batch, tokens.device)
        extras["keep"] = keep
        if self.edge_head is None:
            index = subsample_index(grid, tokens.device).expand(batch, -1)  # [B, M], the same subsample for all
            pad_mask = None
        else:
            _, index, pad_mask = select_tokens(tokens, keep)  # [B, M] positions in N, [B, M] True = padding
            pad_mask = pad_mask if bool(pad_mask.any()) else None
        small_grid = shrunk_grid(grid)
        tokens = backbone.run_block(qd_index, tokens, grid, query_index=index)  # [B, M, C]
        for i in range(qd_index, deepest + 1):
            if i > qd_index:
                tokens = backbone.run_block(i, tokens, grid, key_padding_mask=pad_mask, positions=index)
            if i in wanted and i < deepest:
                saved[i] = backbone.tokens_to_map(tokens, small_grid)  # [B, C, h/2, w/2] (QD only)
        if self.qu is None:
            saved[deepest] = backbone.tokens_to_map(tokens, small_grid)  # [B, C, h/2, w/2]
        else:
            restored = self.qu(pre_qd, tokens, grid, pad_mask)  # [B, N, C] (D without qu_out_proj)
            if self.options.qu_skip:
                restored = restored + nearest_grid(tokens, index, pad_mask, keep, grid)  # [B, N, C]
            saved[deepest] = backbone.tokens_to_map(restored, self.qu.output_grid(grid))  # [B, C, h, w]
        return [saved[i] for i in backbone.out_indices], extras

    def token_counts(self, extras: dict) -> dict[str, torch.Tensor]:
        """What :meth:`encode` did to the tokens, as counts (``ops/scores.py``): queries kept by QD,
        EQD's predicted edge tokens, all tokens at 1/16."""
        keep = extras["keep"]  # [B, N]
        counts = {"tokens": torch.tensor(keep.numel()), "kept": keep.sum()}
        if "edge_logits" in extras:
            counts["edges"] = (EdgeHead.edge_probability(extras["edge_logits"]) > self.options.edge_threshold).sum()
        return counts

    # ------------------------------------------------------------------ decoder
    def decode(self, features: list[torch.Tensor]) -> dict:
        if self.options.head_mode == "thesis":
            return self.decode_head(features)
        return self.decode_head.forward_layerwise(features)  # released ``ATMSingleHead``

    # ------------------------------------------------------------------ forward
    def forward_scores(self, images: torch.Tensor) -> ScoreMap:
        """The one scoring entry: the scores, unformed, carrying the token counts (``ops/scores.py``)."""
        features, extras = self.encode(images, None)
        scores = self.decode_head.score_map(self.decode(features), tuple(images.shape[-2:]))
        return scores.with_counts(self.token_counts(extras))

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        if labels is None:
            return self.forward_scores(images).full()  # [B, K, H, W]
        features, extras = self.encode(images, labels)
        outputs = self.decode(features)
        losses = self.losses(features, outputs, labels)
        if self.edge_head is not None:
            targets = extras["edge_targets"].flatten(1)  # [B, N]
            losses["edge.loss_edge"] = edge_loss(extras["edge_logits"], targets, self.ignore_index,
                                                 self.options.edge_loss_weight)
        return losses

    @torch.no_grad()
    def exit_map_keys(self) -> list[dict[int, str]]:
        """What the grey levels of :meth:`exit_maps`' one map mean (the key beside it in ``predict
        --show-pruning``)."""
        return [{0: "query dropped by QD", 255: f"query kept by QD (block {self.options.qd_index + 1})"}]

    def exit_maps(self, images: torch.Tensor) -> list[np.ndarray]:
        """One uint8 image per input (first of the batch): 255 = query kept by QD, 0 = dropped; at image size."""
        was_training = self.training
        self.eval()
        _, extras = self.encode(images[:1])
        self.train(was_training)
        height, width = images.shape[-2:]
        grid = (height // self.backbone.patch_size, width // self.backbone.patch_size)
        keep = extras["keep"][0].view(1, 1, *grid).float()  # [1, 1, h, w]
        keep = F.interpolate(keep, size=(height, width), mode="nearest")[0, 0]  # [H, W]
        return [(keep * 255).to(torch.uint8).cpu().numpy()]


@SEGMENTORS.register("shrunk", ShrunkOptions)
def build_shrunk(options: ShrunkOptions, backbone, decode_head, aux_heads) -> ShrunkSegmentor:
    return ShrunkSegmentor(options, backbone, decode_head, aux_heads)
