"""DToP: dynamic token pruning by early exit of easy tokens (thesis ch. 5).

A plain ViT is cut into stages by its auxiliary heads (thesis 5.2.2, fig. 5.2). At the end of
each stage the auxiliary head grades every token still in play; a token whose largest per-class
probability reaches ``p0`` *exits*: its prediction is final (the head's per-class scores) and
later blocks no longer see it. For every class present among the exiting tokens of an image,
the ``k`` most confident of them stay in anyway, as context for the remaining tokens (thesis
5.2.4). The final head runs on the tokens that reached it; the output map combines every
stage's predictions. ``p0 >= 1`` is the unpruned model (thesis 5.3.3.2: "when p0 = 1 the model
degenerates to the baseline"): no token is graded, the auxiliary heads do not run, and the
output equals :class:`~segcli.models.segmentor.EncoderDecoder`'s.

:class:`DToPSegmentor` composes the parts of an encoder-decoder (same attribute names, so a
checkpoint of a plain ``encoder_decoder`` with auxiliary heads loads unchanged: DToP@Direct),
and drives the backbone through its block-level API (``embed`` / ``run_block``).

Batching (what the released code does not do: it zeroes exited tokens and, once one token has
exited, loops over the images of a batch). The kept tokens of every image are packed to the
front of a ``[B, M, C]`` tensor, M = the largest kept count of the batch, and the blocks run on
that with a key padding mask (``segcli/models/tokens.py``). ``index`` [B, M] remembers each
packed token's grid position. Padding changes nothing for real tokens: they attend to exactly
the tokens they would attend to alone, so a batch gives every image the result it gets alone
(tested). Padding beats both alternatives, packing the batch into one sequence with a
block-diagonal mask and the released image-by-image loop, which can be slower than not pruning
at all (measured by ``benchmarks/dtop_speed.py``, which times all three).

Decisions (the thesis is silent, or the released code, zbwxp/Dynamic-Token-Pruning, differs):

* **Score.** Per token, the largest per-class probability under the grading head. For an ATM
  head query c is class c (no matching, thesis 4.2.1), so the probability of class c is
  ``softmax(cls_c)[c] · sigmoid(mask_c)``: the released formula (``per_img_forward`` in
  ``mmseg_custom/decode_heads/prune_head.py``), at most 1. (The head's
  map sums over queries, ``Σ_q softmax(cls_q)[c] · sigmoid(mask_q)`` (eq. 4.4), which can exceed 1
  and so is no probability; the two agree once queries predict only their class or "no
  object", which is what the ATM loss trains.) For logit heads (FCN, SETR): the softmax over
  classes. The rule is ``score >= p0`` (thesis 5.2.2); ``strict: true`` uses ``>`` as released.
  An exited token keeps its head's own scores (eq. 4.4 for ATM) as its prediction.
* **Context.** Ties in confidence are broken by grid position (a stable sort), so the rule is
  deterministic. With ``k = 0`` (table 5.5's "Remove") an image whose every token would exit
  keeps its least confident one, because a head needs at least one token.
* **Heads.** Every grading head and the decode head must read one backbone layer (ATM with one
  stage, FCN, SETR...: ``head.input_layer()`` is not None), as the thesis decouples them (5.2.3);
  the decode head reads the block after the last exit. A head that says it runs on token subsets
  (``head.supports_token_input``: a one-stage ATM head with the padding mask, a bilinear head or
  an FCN head of 1×1 convolutions, per token) runs on the packed tokens through
  ``head.forward_tokens``. Other heads need a spatial map: they get the full grid in which
  exited tokens keep the features they had when they exited (their own map would otherwise have
  holes). How a head runs is decided by :func:`~segcli.models.dtop_heads.head_kind`: one adapter
  per kind (``models/dtop_heads.py``), with one interface (outputs on the kept tokens, grading,
  loss outputs, scores as decode head), so :meth:`DToPSegmentor.run` knows no head format.
* **Combining** (``combine: thesis``, the default: exited tokens keep the prediction of the head
  where they exited, thesis 5.2.2 "predictions from each stage jointly form the final results";
  ``combine: released``, which the recipes of the published experiments use: they keep their
  early mask logits under the decode head's class probabilities, which needs ATM heads
  everywhere). With ``combine: thesis`` and an ATM decode head, a
  token-level canvas ``[B, K, h, w]`` holds each token's per-class probabilities from the head
  it left by, and is upsampled bilinearly: this is the ATM head's own ``mask_resolution: low``
  order, so DToP requires it. With a logit decode head (FCN, SETR) the decode head's scores are
  kept where tokens reached it; exited pixels take the log-probabilities of their exit head,
  upsampled bilinearly among exited tokens only (normalised by the upsampled exit indicator).
  Log-probabilities differ from the head's logits by a per-pixel constant, so averaging over
  flips and windows ranks classes the same way. Each variant is one combiner
  (:class:`ThesisCombiner`, :class:`ReleasedCombiner`: what an exit stage records, and how the
  output is formed from the records and the decode head's outputs).
* **Training (DToP@Finetune).** Pruning is active when training too (thesis 5.3.3.1: the heads
  are finetuned, or the model retrained, "using DToP"); the exit rule takes no gradient. Each
  head's loss covers the whole image, as released (zbwxp/Dynamic-Token-Pruning
  ``mmseg_custom/backbone/vit_prune.py`` passes a ``canvas`` from head to head, and
  ``decode_heads/prune_head.py`` overwrites only the tokens in play and gives the canvas to its
  ``ATMLoss``): a token that exited earlier enters a head's loss with the outputs it left with,
  which for ATM heads are the mask logits of the last head that saw it, under this head's class
  logits; they keep their graph, so the later loss also trains the head it exited by. Pointwise
  heads carry logits the same way; map heads predict every pixel from the full grid. Where a
  token has no output of a head's format (it exited by a head of another kind before any head
  of this kind saw it), its pixels are ignored in that head's loss. The thesis does not say
  which pixels the losses see. ``freeze_backbone: true`` trains the heads only (thesis 5.3.3.1
  "finetuning the segmentation heads"); the released ``prune_*`` configs train every parameter
  (head lr ×10): the default. Auxiliary heads that are not exits are frozen and unused
  (``frozen_modules`` lists what is frozen; :class:`~segcli.models.base.FrozenPartsMixin`
  keeps it in eval mode).
* **FLOPs.** The grading work lives in parameter-free ``graders.{m}`` modules next to
  ``aux_heads``, so a by-module count separates "with" and "without" auxiliary heads
  (``aux_flop_modules``, read by :func:`segcli.engine.flops.count_flops_split`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..configurable import NonNegativeInt, Range
from ..errors import SegcliError
from ..ops.scores import ScoreMap, UpsampledScores, nearest_rows, resize_rows
from ..registry import SEGMENTORS
from .base import FrozenPartsMixin, resize
from .exportable import ExportSupport, data_dependent, static_only
from .dtop_heads import HeadAdapter, TokenState, adapt_head, atm_class_probs, atm_token_probs, head_kind
from .tokens import scatter_tokens, select_tokens

AUX_MODULES = ("aux_heads", "graders")  # module names whose FLOPs are the auxiliary heads' cost


@dataclass(frozen=True)
class DToPOptions:
    """``model.type: dtop`` options (``model.options``), e.g.
    ``{p0: 0.95, k: 5, exit_layers: [5, 7]}`` for ViT-B (thesis 5.3.2-5.3.3).

    ``exit_layers`` are 0-based backbone blocks; each must be read by exactly one auxiliary head,
    which then grades the tokens after that block. None = every auxiliary head that reads a
    block before the decode head's, in order.
    """

    p0: Annotated[float, Range(0, 1, low_open=True)] = 0.95  # confidence threshold; 1.0 = no pruning (the baseline)
    k: NonNegativeInt = 5  # most confident exiting tokens per present class that stay for context
    exit_layers: tuple[NonNegativeInt, ...] | None = None  # grading blocks (0-based); None = all aux heads before the decode
    strict: bool = False  # exit if score > p0 (released code) instead of >= p0 (thesis)
    freeze_backbone: bool = False  # train the heads only (thesis 5.3.3.1's wording); released: everything
    # how exited tokens enter the output map. "thesis": each keeps the per-class scores of the head
    # it left by (thesis 5.2.2). "released": each keeps the mask logits of that head, and the decode
    # head's class probabilities are applied to every token's masks (zbwxp/Dynamic-Token-Pruning
    # decode_heads/prune_head.py); ATM heads only.
    combine: Literal["thesis", "released"] = "thesis"

    def __post_init__(self):  # p0 and k: their ranges are checked at load (configurable.Range)
        if self.exit_layers is not None and len(set(self.exit_layers)) != len(self.exit_layers):
            raise ValueError(f"exit_layers repeats a block: {list(self.exit_layers)}")


# --------------------------------------------------------------------------- the exit rule


def exit_decision(probs: torch.Tensor, valid: torch.Tensor, p0: float, k: int, strict: bool = False) -> torch.Tensor:
    """Which tokens exit: ``probs`` [B, M, K] per-class probabilities, ``valid`` [B, M] -> [B, M] bool.

    A valid token exits if its top probability reaches ``p0``, unless it is among the ``k`` most
    confident exiting tokens of its predicted class in its image (thesis 5.2.4).
    """
    batch, length, num_classes = probs.shape
    confidence, label = probs.max(dim=-1)  # [B, M]
    confident = (confidence > p0 if strict else confidence >= p0) & valid
    group = torch.where(confident, label, torch.full_like(label, num_classes))  # others: group K
    # order tokens by (group, confidence descending, position): two stable sorts
    by_confidence = torch.sort(confidence, dim=1, descending=True, stable=True).indices  # [B, M]
    by_group = torch.sort(torch.gather(group, 1, by_confidence), dim=1, stable=True).indices  # [B, M]
    order = torch.gather(by_confidence, 1, by_group)  # [B, M]
    sorted_group = torch.gather(group, 1, order)  # [B, M]
    position = torch.arange(length, device=probs.device).expand(batch, length)  # [B, M]
    starts = torch.ones_like(sorted_group, dtype=torch.bool)
    starts[:, 1:] = sorted_group[:, 1:] != sorted_group[:, :-1]
    group_start = torch.where(starts, position, torch.zeros_like(position)).cummax(dim=1).values
    rank = torch.empty(batch, length, dtype=torch.long, device=probs.device)
    rank = rank.scatter(1, order, position - group_start)  # [B, M]: rank within its class, 0 = most confident
    leave = confident & (rank >= k)
    # a head needs at least one token: an image left empty (only possible with k = 0) keeps its least confident one
    empty = ~(valid & ~leave).any(dim=1)  # [B]
    least = torch.where(valid, confidence, torch.full_like(confidence, float("inf"))).argmin(dim=1)  # [B]
    rescue = torch.zeros_like(leave).scatter(1, least[:, None], empty[:, None])
    return leave & ~rescue


class TokenGrader(nn.Module):
    """Per-class probabilities of a grading head's tokens, and the exit rule (parameter-free).

    A module only so that FLOP counts by module put this work with the auxiliary heads.
    """

    def __init__(self, options: DToPOptions):
        super().__init__()
        self.p0, self.k, self.strict = options.p0, options.k, options.strict

    def forward(self, valid: torch.Tensor, *, logits: torch.Tensor | None = None,
                class_logits: torch.Tensor | None = None, mask_logits: torch.Tensor | None = None):
        """``logits`` [B, K, M] or ATM ``class_logits`` [B, K, K+1] + ``mask_logits`` [B, K, M]
        -> (the head's per-class scores [B, M, K], exiting [B, M] bool)."""
        if logits is not None:
            scores = confidence = logits.transpose(1, 2).softmax(dim=-1)  # [B, M, K]
        else:
            scores = atm_token_probs(class_logits, mask_logits)  # [B, M, K]
            confidence = atm_class_probs(class_logits.detach(), mask_logits.detach())  # [B, M, K]
        with torch.no_grad():
            leave = exit_decision(confidence.detach(), valid, self.p0, self.k, self.strict)
        return scores, leave


# --------------------------------------------------------------------------- what a forward did


@dataclass
class PruneTrace:
    """What one pruned forward did: ``exit_stage`` [B, N] (stage a token exited at, -1 = reached
    the decode head), the grid, and per head (exits then decode) ``(head_name, head, outputs,
    labelled [B, N])`` for the losses (``labelled``: the tokens the outputs predict, see the
    module docstring); ``token_scores`` [B, N, K] (ATM decode) or ``scores`` [B, K, H, W] in
    inference."""

    exit_stage: torch.Tensor
    grid: tuple[int, int]
    heads: list = field(default_factory=list)
    token_scores: torch.Tensor | None = None
    score_map: ScoreMap | None = None  # inference: the combined scores, unformed (ops/scores.py)

    @property
    def scores(self) -> torch.Tensor | None:
        """The combined scores [B, K, H, W] (inference)."""
        return None if self.score_map is None else self.score_map.full()


class ExitBlendScores(ScoreMap):
    """Logit decode heads with exits: exited pixels take their exit head's log-probabilities,
    spread bilinearly among exited tokens only (``resize(values × indicator) / resize(indicator)``);
    the other pixels keep the decode head's scores (``decode``)."""

    def __init__(self, decode: ScoreMap, exit_probs: torch.Tensor, exit_stage: torch.Tensor, grid: tuple[int, int]):
        self.decode, self.grid = decode, tuple(grid)
        self.batch, self.channels, self.size = decode.batch, decode.channels, tuple(decode.size)
        self.exited = (exit_stage >= 0).to(exit_probs.dtype).view(self.batch, 1, *self.grid)  # [B, 1, h, w]
        log_probs = exit_probs.clamp_min(1e-6).log().transpose(1, 2).reshape(self.batch, self.channels, *self.grid)
        self.weighted = log_probs * self.exited  # [B, K, h, w]

    def full(self) -> torch.Tensor:
        scores = self.decode.full()  # [B, K, H, W]
        spread = resize(self.weighted, self.size) / resize(self.exited, self.size).clamp_min(1e-6)  # [B, K, H, W]
        pixel_exited = F.interpolate(self.exited, size=self.size, mode="nearest") > 0  # [B, 1, H, W]
        return torch.where(pixel_exited, spread.to(scores.dtype), scores)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        scores = self.decode.rows(start, stop)  # [B, K, n, W]
        height = self.grid[0]
        weighted = resize_rows(lambda a, b: self.weighted[:, :, a:b], height, self.size, start, stop)  # [B, K, n, W]
        exited = resize_rows(lambda a, b: self.exited[:, :, a:b], height, self.size, start, stop)  # [B, 1, n, W]
        pixel_exited = nearest_rows(lambda a, b: self.exited[:, :, a:b], height, self.size, start, stop) > 0
        return torch.where(pixel_exited, (weighted / exited.clamp_min(1e-6)).to(scores.dtype), scores)


# --------------------------------------------------------------------------- combining the stages


class ThesisCombiner:
    """``combine: thesis``: every exited token keeps the per-class scores of the head it left by
    (thesis 5.2.2); the decode head's scores cover the tokens that reached it."""

    def __init__(self):
        self.exit_scores = None  # [B, N, K] per-class scores of the exited tokens

    def record(self, adapter: HeadAdapter, outputs: dict, scores: torch.Tensor, leave: torch.Tensor,
               state: TokenState) -> None:
        """One exit stage graded: keep the leaving tokens' ``scores`` [B, M, K]. Scattered even when
        none leaves, so that the output depends on the grading in a traced graph too (else fvcore
        drops its FLOPs as dead code)."""
        if self.exit_scores is None:
            self.exit_scores = scores.new_zeros(state.full.shape[0], state.full.shape[1], scores.shape[-1])
        self.exit_scores = scatter_tokens(self.exit_scores, scores.detach().to(self.exit_scores.dtype), state.index,
                                          ~leave)  # [B, N, K]

    def finish(self, decode: HeadAdapter, outputs: dict, state: TokenState, exit_stage: torch.Tensor,
               grid: tuple[int, int], size: tuple[int, int]) -> tuple[torch.Tensor | None, ScoreMap]:
        """(per-token scores [B, N, K] or None, the output map -> [B, K, H, W])."""
        scores = decode.token_scores(outputs)  # [B, M, K]
        if scores is None:  # a logit decode head forms its own map; exited pixels are blended in
            score_map = decode.score_map(outputs, size)
            if self.exit_scores is None:  # nothing graded (p0 = 1)
                return None, score_map
            return None, ExitBlendScores(score_map, self.exit_scores, exit_stage, grid)
        batch, num = exit_stage.shape
        canvas = self.exit_scores if self.exit_scores is not None else scores.new_zeros(batch, num, scores.shape[-1])
        token_scores = scatter_tokens(canvas.to(scores.dtype), scores, state.index, state.pad)  # [B, N, K]
        grid_scores = token_scores.transpose(1, 2).reshape(batch, -1, *grid)  # [B, K, h, w]
        return token_scores, UpsampledScores(grid_scores, size)


class ReleasedCombiner:
    """``combine: released`` (zbwxp/Dynamic-Token-Pruning ``decode_heads/prune_head.py``): every
    token keeps the mask logits of the last head that saw it, under the decode head's class
    probabilities. ATM heads only (checked when the model is built)."""

    def __init__(self):
        self.masks = None  # [B, N, K] mask logits of the last head that saw each token

    def record(self, adapter: HeadAdapter, outputs: dict, scores: torch.Tensor, leave: torch.Tensor,
               state: TokenState) -> None:
        masks = adapter.token_values(outputs).detach()  # [B, M, K]
        if self.masks is None:
            self.masks = masks.new_zeros(state.full.shape[0], state.full.shape[1], masks.shape[-1])
        self.masks = scatter_tokens(self.masks, masks, state.index, state.pad)  # every token this head saw

    def finish(self, decode: HeadAdapter, outputs: dict, state: TokenState, exit_stage: torch.Tensor,
               grid: tuple[int, int], size: tuple[int, int]) -> tuple[torch.Tensor, ScoreMap]:
        masks = decode.token_values(outputs)  # [B, M, K] the decode head's mask logits at the tokens it saw
        batch, num = exit_stage.shape
        canvas = masks.new_zeros(batch, num, masks.shape[-1]) if self.masks is None else self.masks.to(masks.dtype)
        canvas = scatter_tokens(canvas, masks, state.index, state.pad)  # [B, N, K]
        token_scores = atm_token_probs(outputs["pred_logits"], canvas.transpose(1, 2))  # [B, N, K]
        grid_scores = token_scores.transpose(1, 2).reshape(batch, -1, *grid)  # [B, K, h, w]
        mask_size = getattr(decode.head.cfg, "mask_size", None)
        if mask_size:  # the released head resizes to its square img_size first
            grid_scores = resize(grid_scores, (mask_size, mask_size))
        return token_scores, UpsampledScores(grid_scores, size)


COMBINERS = {"thesis": ThesisCombiner, "released": ReleasedCombiner}  # DToPOptions.combine -> its combiner


# --------------------------------------------------------------------------- the segmentor


class DToPSegmentor(FrozenPartsMixin, nn.Module):
    """Backbone + decode head + auxiliary heads, run in stages with early exit of easy tokens."""

    compilable_parts: tuple[str, ...] = ()  # embed / run_block / forward_tokens: no module forward() runs

    aux_flop_modules = AUX_MODULES  # counted apart by `segcli eval --flops` (gflops_avg_without_aux)

    def __init__(self, options: DToPOptions, backbone: nn.Module, decode_head: nn.Module, aux_heads):
        super().__init__()
        for name in ("embed", "run_block", "out_indices"):
            if not hasattr(backbone, name):
                raise SegcliError(f"DToP prunes plain ViT tokens; the {type(backbone).__name__} backbone has no "
                                  "block-level API", "model.backbone.type", "use a vit backbone")
        self.options = options
        self.backbone = backbone
        self.decode_head = decode_head
        self.aux_heads = nn.ModuleList(aux_heads)
        decode_layer = decode_head.input_layer()
        if decode_layer is None:
            raise SegcliError("DToP's decode head must read one backbone layer (its heads are decoupled, thesis "
                              "5.2.3)", "model.decode_head.in_index", "e.g. atm with in_index: [2], or setr/fcn")
        if head_kind(decode_head, decode=True) == "class_masks" and decode_head.mask_resolution != "low":
            raise SegcliError("DToP combines the stages' predictions at token resolution, which is the ATM head's "
                              "'low' order", "model.decode_head.mask_resolution",
                              "set it to low (the weights do not depend on it)")
        self.decode_layer = decode_layer
        self.decode_block = backbone.out_indices[decode_layer]
        aux_layers = [h.input_layer() for h in aux_heads]
        aux_blocks = [backbone.out_indices[i] if i is not None else None for i in aux_layers]
        if not aux_heads:
            raise SegcliError("DToP needs auxiliary heads to grade tokens, and this model has none", "model.aux_heads",
                              "train a model with aux_heads on the exit blocks, e.g. recipes/dtop_vit_b_ade20k.yaml")
        if options.exit_layers is None:
            exits = sorted(b for b in aux_blocks if b is not None and b < self.decode_block)
        else:
            exits = list(options.exit_layers)
        readable = ", ".join(str(b) for b in aux_blocks if b is not None) or "none"
        for block in exits:
            if block not in aux_blocks:
                raise SegcliError(f"block {block} has no auxiliary head to grade tokens (aux heads read blocks "
                                  f"{readable})", "model.options.exit_layers", "list blocks that have an aux head")
            if aux_blocks.count(block) > 1:
                raise SegcliError(f"two auxiliary heads read block {block}; DToP cannot tell which one grades",
                                  "model.options.exit_layers")
            if block >= self.decode_block:
                raise SegcliError(f"exit block {block} is not before the decode head's block {self.decode_block}",
                                  "model.options.exit_layers")
        if not exits:
            raise SegcliError("no auxiliary head reads a block before the decode head's", "model.aux_heads",
                              f"aux heads read blocks {readable}; the decode head reads {self.decode_block}")
        if exits != sorted(exits):
            raise SegcliError(f"exit blocks must be increasing, got {exits}", "model.options.exit_layers")
        self.exit_layers = tuple(exits)
        self.exit_heads = tuple(aux_blocks.index(b) for b in exits)
        self.exit_positions = tuple(aux_layers[i] for i in self.exit_heads)  # positions in backbone outputs
        if options.combine == "released" and any(
                head_kind(h, decode=h is decode_head) != "class_masks"
                for h in [decode_head, *(self.aux_heads[i] for i in self.exit_heads)]):
            raise SegcliError("combine: released keeps mask logits, so every exit head and the decode head must be "
                              "an ATM head", "model.options.combine", "use combine: thesis with other heads")
        # heads that need the full grid (exited tokens frozen at exit) make every exit update it
        self.needs_full = head_kind(decode_head, decode=True) == "map" or any(
            head_kind(self.aux_heads[i]) == "map" for i in self.exit_heads)
        self.graders = nn.ModuleList(TokenGrader(options) for _ in exits)
        self.freeze_parts()

    @property
    def num_classes(self) -> int:
        return self.decode_head.num_classes

    @property
    def pruning(self) -> bool:
        return self.options.p0 < 1.0

    def export_support(self) -> ExportSupport:
        """At p0 < 1 which tokens exit depends on the image; at p0 = 1 nothing exits and the forward
        is the unpruned model's (backbone blocks, then the decode head)."""
        if self.pruning:
            return data_dependent("DToP with p0 < 1", "model.options.p0",
                                  "export at p0 = 1 (segcli prune --p0 1.0); see README Deploy")
        staged = static_only("DToP's staged forward (embed, run_block, heads on packed tokens) does not keep "
                             "sizes symbolic: its dynamic graph fails at run time")
        return staged & self.backbone.export_support() & self.decode_head.export_support()

    def frozen_modules(self) -> list[nn.Module]:
        """Auxiliary heads that are no exit (kept for the checkpoint, never run) and, with
        ``freeze_backbone``, the backbone (whose drop-path and dropout then stay off too)."""
        unused = [head for i, head in enumerate(self.aux_heads) if i not in self.exit_heads]
        return [*unused, self.backbone] if self.options.freeze_backbone else unused

    # ------------------------------------------------------------------ the staged forward
    def run(self, images: torch.Tensor, keep_outputs: bool = False) -> PruneTrace:
        """The pruned forward. ``keep_outputs`` keeps every head's outputs for the losses (training);
        otherwise the combined scores are formed (inference). Each head runs through its adapter
        (``models/dtop_heads.py``); the exits and the decode head's outputs are combined by the
        ``combine`` variant's combiner."""
        tokens, grid = self.backbone.embed(images)  # [B, N, C]
        batch, num, _ = tokens.shape
        index = torch.arange(num, device=tokens.device).expand(batch, num)  # [B, N]
        state = TokenState(tokens, index, torch.zeros(batch, num, dtype=torch.bool, device=tokens.device), tokens)
        exit_stage = torch.full((batch, num), -1, dtype=torch.long, device=tokens.device)  # [B, N]
        trace = PruneTrace(exit_stage, grid)
        combiner = COMBINERS[self.options.combine]()
        carried: dict = {}  # training: per head kind, the outputs each token left its last head with
        grade = self.pruning or keep_outputs
        stages = {block: m for m, block in enumerate(self.exit_layers)} if grade else {}
        subset = padded = False  # any token exited (blocks need grid positions) / some image has padding
        for block in range(self.decode_block + 1):
            state.packed = self.backbone.run_block(block, state.packed, grid, positions=state.index if subset else None,
                                                   key_padding_mask=state.pad if padded else None)
            if block not in stages:
                continue
            stage = stages[block]
            adapter = adapt_head(self.aux_heads[self.exit_heads[stage]], self.exit_positions[stage], self.backbone)
            outputs = adapter.run(state, grid, padded)
            if keep_outputs:
                trace.heads.append((f"aux{self.exit_heads[stage]}", adapter.head,
                                    *adapter.loss_outputs(outputs, state, grid, carried)))
            if not self.pruning:
                continue
            scores, leave = adapter.grade(self.graders[stage], outputs, state, grid)  # [B, M, K], [B, M]
            combiner.record(adapter, outputs, scores, leave, state)
            if not bool(leave.any()):
                continue
            exit_stage = scatter_tokens(exit_stage[..., None], torch.full_like(state.index, stage)[..., None],
                                        state.index, ~leave)[..., 0]  # [B, N]
            if self.needs_full:
                state.sync_full()  # exited tokens keep the features they leave with
            packed, sub_index, state.pad = select_tokens(state.packed, ~state.pad & ~leave)  # [B, M', C]
            state.packed, state.index = packed, torch.gather(state.index, 1, sub_index)  # [B, M'] grid positions
            subset, padded = True, bool(state.pad.any())
        trace.exit_stage = exit_stage
        decode = adapt_head(self.decode_head, self.decode_layer, self.backbone, decode=True)
        outputs = decode.run(state, grid, padded)
        if keep_outputs:
            trace.heads.append(("decode", self.decode_head, *decode.loss_outputs(outputs, state, grid, carried)))
            return trace
        trace.token_scores, trace.score_map = combiner.finish(decode, outputs, state, exit_stage, grid,
                                                              tuple(images.shape[-2:]))
        return trace

    # ------------------------------------------------------------------ public forward
    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        if labels is not None:
            return self.losses(self.run(images, keep_outputs=True), labels)
        return self.forward_scores(images).full()

    def forward_scores(self, images: torch.Tensor) -> ScoreMap:
        """The scores, unformed, carrying the token counts (``ops/scores.py``): ``exited.<m>`` (tokens
        that left at stage m), ``kept`` (reached the decode head), ``tokens``."""
        trace = self.run(images)
        stage = trace.exit_stage  # [B, N]
        counts = {f"exited.{m}": (stage == m).sum() for m in range(len(self.exit_layers))}
        counts.update(kept=(stage < 0).sum(), tokens=torch.tensor(stage.numel()))
        return trace.score_map.with_counts(counts)

    def losses(self, trace: PruneTrace, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each head's own loss on the whole image: exited tokens with the outputs they left with
        (module docstring); pixels of tokens with no output of the head's format are ignored."""
        batch = labels.shape[0]
        losses = {}
        for name, head, outputs, labelled in trace.heads:
            head_labels = labels
            if not bool(labelled.all()):
                unlabelled = (~labelled).to(torch.float32).view(batch, 1, *trace.grid)  # [B, 1, h, w]
                unlabelled = F.interpolate(unlabelled, size=tuple(labels.shape[-2:]), mode="nearest")[:, 0] > 0
                head_labels = labels.masked_fill(unlabelled, head.ignore_index)  # [B, H, W]
            losses.update({f"{name}.{k}": v for k, v in head.loss(outputs, head_labels).items()})
        return losses

    # ------------------------------------------------------------------ visualisation (thesis fig. 5.4)
    @torch.no_grad()
    def exit_map_keys(self) -> list[dict[int, str]]:
        """What the grey levels of each of :meth:`exit_maps`' maps mean (the key ``predict
        --show-pruning`` draws beside them)."""
        return [{0: "still in play", 128: "exited at an earlier stage",
                 255: f"exited at stage {m + 1} (block {block + 1})"} for m, block in enumerate(self.exit_layers)]

    def exit_maps(self, images: torch.Tensor) -> list[np.ndarray]:
        """One uint8 map [H, W] per exit stage for one image [1, 3, H, W]: 255 = exited at this
        stage, 128 = exited earlier, 0 = still in play (the bright/dark maps of thesis fig. 5.4)."""
        if images.shape[0] != 1:
            raise ValueError(f"exit_maps takes one image, got a batch of {images.shape[0]}")
        height, width = images.shape[-2:]
        divisor = int(getattr(self.backbone, "size_divisor", 1) or 1)
        padded = F.pad(images, (0, (-width) % divisor, 0, (-height) % divisor))
        was_training = self.training
        self.eval()
        try:
            trace = self.run(padded)
        finally:
            self.train(was_training)
        stage = trace.exit_stage.view(1, 1, *trace.grid).float()  # [1, 1, h, w]
        stage = F.interpolate(stage, size=tuple(padded.shape[-2:]), mode="nearest")[0, 0, :height, :width]  # [H, W]
        stage = stage.long().cpu().numpy()
        maps = []
        for m in range(len(self.exit_layers)):
            image = np.zeros(stage.shape, dtype=np.uint8)
            image[(stage >= 0) & (stage < m)] = 128
            image[stage == m] = 255
            maps.append(image)
        return maps


@SEGMENTORS.register("dtop", DToPOptions)
def build_dtop(options: DToPOptions, backbone, decode_head, aux_heads) -> DToPSegmentor:
    return DToPSegmentor(options, backbone, decode_head, aux_heads)
