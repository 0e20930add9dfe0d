"""How DToP runs a head on the tokens still in play: one adapter per head kind (thesis 5.2.3).

DToP (``models/dtop.py``, whose module docstring holds the decisions) grades tokens with its exit
heads and finishes with the decode head, each on the tokens in play. A head runs in one of three
ways, decided by :func:`head_kind` from what the head says it can do; each way is an adapter with
the same small interface:

* :meth:`~HeadAdapter.run`: the head's outputs on the tokens in play, in the head's own format
  (ATM: ``pred_logits`` [B, K, K+1] and ``pred_masks`` [B, K, M]; a logit head: ``logits``);
* :meth:`~HeadAdapter.grade`: per kept token, the per-class scores it keeps if it exits
  [B, M, K], and whether it exits [B, M] (through the stage's grader, so that FLOP counts put the
  grading with the auxiliary heads);
* :meth:`~HeadAdapter.loss_outputs`: the outputs on the whole grid for the head's loss, exited
  tokens carrying what they left with, and the tokens they predict;
* :meth:`~HeadAdapter.token_scores` / :meth:`~HeadAdapter.score_map`: what the combiners
  (``models/dtop.py``) build the output from, as a decode head.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.scores import ScoreMap
from .base import DecodeHead
from .heads.atm import query_class_probs
from .tokens import scatter_tokens


def atm_token_probs(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """ATM per-class scores per token (thesis eq. 4.4): [B, Q, K+1], [B, Q, M] -> [B, M, K]."""
    return torch.einsum("bqc,bqm->bmc", query_class_probs(class_logits), mask_logits.sigmoid())


def atm_class_probs(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """Probability that a token is class c, query c being class c: [B, K, K+1], [B, K, M] -> [B, M, K]."""
    own_class = query_class_probs(class_logits).diagonal(dim1=1, dim2=2)  # [B, K]: query c says "class c"
    return (own_class[..., None] * mask_logits.sigmoid()).transpose(1, 2)  # [B, M, K]


def head_kind(head: DecodeHead, decode: bool = False) -> str:
    """How DToP runs a head on the tokens in play, from what the head says it can do:

    * ``class_masks``: a mask-classification head (ATM) on the packed tokens with the padding mask
      (``forward_tokens``); as grader and as decode head, whose per-token scores form the output;
    * ``pointwise``: a per-token logit head on the packed tokens; grading heads only, because a
      logit decode head's scores are its own spatial upsampling of a full map;
    * ``map``: the full grid, exited tokens frozen at exit.
    """
    if not head.supports_token_input:
        return "map"
    if head.output_format == "class_masks":
        return "class_masks"
    return "map" if decode else "pointwise"


@dataclass
class TokenState:
    """The tokens in play: ``packed`` [B, M, C], their grid ``index`` [B, M], ``pad`` [B, M]
    (True = padding), and ``full`` [B, N, C]: the whole grid, exited tokens frozen at exit."""

    packed: torch.Tensor
    index: torch.Tensor
    pad: torch.Tensor
    full: torch.Tensor

    def sync_full(self) -> torch.Tensor:
        self.full = scatter_tokens(self.full, self.packed, self.index, self.pad)
        return self.full


class HeadAdapter:
    """One head of a DToP model, reading backbone output ``position``, run on the tokens in play.

    Made per forward (cheap, and never stale if a head is replaced); holds no tensors.
    """

    kind = ""

    def __init__(self, head: DecodeHead, position: int, backbone):
        self.head, self.position, self.backbone = head, position, backbone

    def run(self, state: TokenState, grid: tuple[int, int], padded: bool) -> dict:
        """The head's outputs on the tokens in play. ``padded`` False: no image has padding (no
        token exited yet), so no mask is passed (and the unpruned forward has no data-dependent branch)."""
        raise NotImplementedError

    def grade(self, grader, outputs: dict, state: TokenState, grid: tuple[int, int]):
        """``grader`` (a :class:`~segcli.models.dtop.TokenGrader`) on the kept tokens ->
        (per-class scores [B, M, K], exiting [B, M] bool)."""
        raise NotImplementedError

    def token_values(self, outputs: dict) -> torch.Tensor:
        """What each kept token carries into later losses: [B, M, K] (dtop's docstring, Training)."""
        raise NotImplementedError

    def on_grid(self, outputs: dict, values: torch.Tensor) -> dict:
        """The head's outputs with ``values`` [B, K, h, w] (every token's carried values) in place of its own."""
        raise NotImplementedError

    def loss_outputs(self, outputs: dict, state: TokenState, grid: tuple[int, int],
                     carried: dict) -> tuple[dict, torch.Tensor]:
        """The head's outputs on the whole grid for its loss, and the tokens they predict [B, N].

        ``carried[kind]`` (``(values [B, N, K], labelled [B, N])``, updated here) keeps for every
        token the values of the last head of this kind that saw it: exited tokens keep theirs."""
        values = self.token_values(outputs)  # [B, M, K]
        batch, num = state.full.shape[:2]
        canvas, labelled = carried.get(self.kind) or (values.new_zeros(batch, num, values.shape[-1]),
                                                      torch.zeros(batch, num, dtype=torch.bool, device=values.device))
        canvas = scatter_tokens(canvas.to(values.dtype), values, state.index, state.pad)  # [B, N, K]
        labelled = scatter_tokens(labelled[..., None], torch.ones_like(state.pad)[..., None], state.index,
                                  state.pad)[..., 0]  # [B, N]
        carried[self.kind] = (canvas, labelled)
        return self.on_grid(outputs, canvas.transpose(1, 2).reshape(batch, -1, *grid)), labelled  # [B, K, h, w]

    def token_scores(self, outputs: dict) -> torch.Tensor | None:
        """As decode head: the per-class scores of the tokens it saw [B, M, K], or None for a head that
        forms its own spatial map (:meth:`score_map`)."""
        return None

    def score_map(self, outputs: dict, size: tuple[int, int]) -> ScoreMap:
        return self.head.score_map(outputs, size)


class ClassMaskAdapter(HeadAdapter):
    """A mask-classification head (ATM) on the packed tokens, with the padding mask."""

    kind = "class_masks"

    def run(self, state, grid, padded):
        outputs = self.head.forward_tokens(state.packed, state.pad if padded else None)
        return {"pred_logits": outputs["pred_logits"], "pred_masks": outputs["pred_masks"]}  # [B, K, K+1], [B, K, M]

    def grade(self, grader, outputs, state, grid):
        return grader(~state.pad, class_logits=outputs["pred_logits"], mask_logits=outputs["pred_masks"])

    def token_values(self, outputs):
        return outputs["pred_masks"].transpose(1, 2)  # [B, M, K] mask logits

    def on_grid(self, outputs, values):
        return {"pred_logits": outputs["pred_logits"], "pred_masks": values}

    def token_scores(self, outputs):
        return atm_token_probs(outputs["pred_logits"], outputs["pred_masks"])  # [B, M, K]


class PointwiseAdapter(HeadAdapter):
    """A per-token logit head on the packed tokens (grading heads only: see :func:`head_kind`)."""

    kind = "pointwise"

    def run(self, state, grid, padded):
        return {"logits": self.head.forward_tokens(state.packed)["logits"]}  # [B, K, M]

    def grade(self, grader, outputs, state, grid):
        return grader(~state.pad, logits=outputs["logits"])

    def token_values(self, outputs):
        return outputs["logits"].transpose(1, 2)  # [B, M, K]

    def on_grid(self, outputs, values):
        return {"logits": values}


class MapAdapter(HeadAdapter):
    """A head that needs a spatial map: the full grid, exited tokens frozen at exit."""

    kind = "map"

    def run(self, state, grid, padded):
        features = [None] * len(self.backbone.out_indices)  # the list a head indexes with its in_index
        features[self.position] = self.backbone.tokens_to_map(state.sync_full(), grid)  # [B, C, h, w]
        return self.head(features)

    def grade(self, grader, outputs, state, grid):
        logits = self.head.seg_logits(outputs, grid).flatten(2)  # [B, K, h*w]
        logits = torch.gather(logits, 2, state.index[:, None, :].expand(-1, logits.shape[1], -1))  # [B, K, M]
        return grader(~state.pad, logits=logits)

    def loss_outputs(self, outputs, state, grid, carried):
        """A map head predicts every pixel from the full grid."""
        batch, num = state.full.shape[:2]
        return outputs, torch.ones(batch, num, dtype=torch.bool, device=state.index.device)


ADAPTERS = {cls.kind: cls for cls in (ClassMaskAdapter, PointwiseAdapter, MapAdapter)}


def adapt_head(head: DecodeHead, position: int, backbone, decode: bool = False) -> HeadAdapter:
    """The adapter of ``head`` (reading backbone output ``position``) by its :func:`head_kind`."""
    return ADAPTERS[head_kind(head, decode)](head, position, backbone)
