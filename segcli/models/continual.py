"""SegViT-CL: a segmentor that grows one ATM head per continual-learning task (thesis 4.2.3, fig. 4.6).

Task ``t`` of a protocol owns the classes ``C_t`` (a contiguous block of class ids, in index
order). Its head is a complete ATM decoder of ``models/heads/atm.py`` built for ``|C_t|``
classes: ``|C_t|`` new class queries (the thesis' class tokens ``G_t``), its own ATM stages
(``A_t``) and its own class FC ``Linear(D, |C_t| + 1)`` (``W_t``). Everything learnt before task
``t`` — the ViT encoder and the heads of tasks ``1..t-1`` — is frozen (eq. 4.7-4.9). The output is
the concatenation, along the class axis, of every task's per-class scores (each head's own
:func:`~segcli.models.heads.atm.semantic_scores`), and the prediction is its argmax (thesis
4.2.3, eq. 4.9 and the text after it).

Decisions (the thesis is silent; SegViT-CL was not released):

* **What is frozen, and how.** A model with ``T > 1`` heads trains only its last head: the
  backbone and heads ``1..T-1`` have ``requires_grad = False`` from construction on, and
  :meth:`ContinualSegmentor.train` keeps them in eval mode even when the model is put in train
  mode, so dropout, drop-path and normalisation statistics behave exactly as at test time. The
  optimizer never sees frozen parameters (``engine/optim.py`` skips them), so weight decay
  cannot move them either: after a step the old parameters are bit-identical, and so are the old
  tasks' scores, because each head reads only the (frozen) backbone features and its own
  parameters — heads never exchange queries. Freezing is a property of the architecture rather
  than of the training script, so a model rebuilt from a checkpoint is frozen the same way.
* **One task, all classes** (``task_classes: []``, the default) is plain SegViT: this is the
  Oracle of table 4.11 (joint training on every class) and what ``segcli train`` of a continual
  recipe produces.
* **Labels.** Labels reach the model with global class ids. The trained (last) head sees them
  mapped to its own ids: its classes ``o..o+n-1`` -> ``0..n-1``, ignore (255) stays ignore, and
  every other valid pixel — a class of an earlier or later task, or the "background" value 254
  that ``segcli/workflows/continual/task_data.py`` writes for them — becomes the head's background ``n``. For the
  ATM criterion a background pixel is a valid pixel of no class: it is a negative of every mask
  (focal and dice) and adds no class target (``present_classes`` drops slot ``n``). This is how
  "old and future classes are labelled background" (thesis 4.3.6) reads for a decoder without a
  background class, and it matters at test time: the new head's masks learn to stay off old-class
  regions, so the concatenated argmax does not hand old-class pixels to new classes.
* **No auxiliary heads**: the thesis' ATM has none, and an auxiliary head would need a
  per-task copy as well. The decode head must be ``atm``.
* **Cost**: every head runs its own stages on the shared features, so inference cost grows by
  one ATM per task; most of an ATM's cost (token projection, keys and values) does not shrink
  with its class count. The thesis reports no FLOPs for SegViT-CL.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..configurable import PositiveInt
from ..errors import SegcliError
from ..ops.scores import ConcatScores
from ..registry import SEGMENTORS
from .base import Backbone, FrozenPartsMixin, HeadContext
from .exportable import ExportSupport
from .heads.atm import ATMHead

BACKGROUND = 254  # label value for "a valid pixel of none of the trained head's classes"
IGNORE = 255


@dataclass(frozen=True)
class ContinualOptions:
    """``model.options`` of ``type: continual``.

    ``task_classes`` lists the class count of every learnt task in protocol order, e.g.
    ``[100, 10, 10]`` after the third step of ADE20K 100-10. ``segcli cl-step`` writes it into the
    recipe it trains, so a checkpoint rebuilds with the right heads. Empty = one task with every
    class of the dataset (the Oracle / plain SegViT).
    """

    task_classes: tuple[PositiveInt, ...] = ()

    def __post_init__(self):
        if any(n < 1 for n in self.task_classes):
            raise ValueError("every task needs at least one class")


def head_label_map(offset: int, num_classes: int) -> torch.Tensor:
    """Lookup table ``[256]`` from global label values to a head's own ids (see the module docstring)."""
    table = torch.full((256,), num_classes, dtype=torch.long)  # other classes, BACKGROUND -> head background
    table[offset:offset + num_classes] = torch.arange(num_classes)
    table[IGNORE] = IGNORE
    return table


class ContinualSegmentor(FrozenPartsMixin, nn.Module):
    """A shared backbone and one ATM head per task; only the last head learns (thesis fig. 4.6)."""

    compilable_parts = ("backbone",)  # the heads run through score_map as well as forward()

    def __init__(self, backbone: Backbone, heads: list[ATMHead]):
        super().__init__()
        if not heads:
            raise ValueError("a continual segmentor needs at least one head")
        self.backbone = backbone
        self.heads = nn.ModuleList(heads)
        self.task_classes = tuple(int(head.num_classes) for head in heads)
        offset = sum(self.task_classes[:-1])
        if offset + self.task_classes[-1] > BACKGROUND:
            raise SegcliError(f"{offset + self.task_classes[-1]} classes do not fit 8-bit labels with the "
                              f"background value {BACKGROUND}", "model.options.task_classes")
        self.register_buffer("label_map", head_label_map(offset, self.task_classes[-1]), persistent=False)
        self.freeze_parts()

    @property
    def num_classes(self) -> int:
        """Classes learnt so far (the channels of the output scores)."""
        return sum(self.task_classes)

    @property
    def num_tasks(self) -> int:
        return len(self.heads)

    def frozen_modules(self) -> list[nn.Module]:
        """What earlier tasks learnt: the backbone and every head but the last (nothing for one task).
        They stay in eval mode when the model trains (:class:`~segcli.models.base.FrozenPartsMixin`)."""
        if self.num_tasks == 1:
            return []
        return [self.backbone, *self.heads[:-1]]

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        if labels is None:
            return self.forward_scores(images).full()  # [B, ΣK_t, H, W]
        return self.losses(self.backbone(images), labels)

    def export_support(self) -> ExportSupport:
        """Inference runs the backbone and every task's head."""
        support = self.backbone.export_support()
        for head in self.heads:
            support = support & head.export_support()
        return support

    def forward_scores(self, images: torch.Tensor) -> ConcatScores:
        """The one scoring entry: every task's per-class scores, each from its own head alone (eq.
        4.8), concatenated along the class axis (global class order), unformed (``ops/scores.py``)."""
        features, size = self.backbone(images), tuple(images.shape[-2:])
        return ConcatScores([head.score_map(head(features), size) for head in self.heads])

    def losses(self, features: list[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The learning head's ATM loss on labels mapped to its classes (old heads are not run)."""
        head = self.heads[-1]
        local = self.label_map[labels]  # [B, H, W], values 0..n (n = background) or 255
        return {f"decode.{k}": v for k, v in head.loss(head(features), local).items()}


@SEGMENTORS.register("continual", ContinualOptions)
def build_continual(options: ContinualOptions, backbone: Backbone, decode_head, aux_heads) -> ContinualSegmentor:
    """Heads for ``options.task_classes`` built from the recipe's ATM decode head config.

    The recipe's decode head (built for the dataset's K classes) is reused as is when there is a
    single task with every class, and otherwise serves as the template of the per-task heads.
    """
    if aux_heads:
        raise SegcliError("the continual segmentor takes no auxiliary heads", "model.aux_heads", "remove them")
    # a true type requirement: the per-task heads are new ATM heads built from this one's config
    if not isinstance(decode_head, ATMHead):
        raise SegcliError("the continual segmentor grows ATM heads; the decode head must be 'atm'",
                          "model.decode_head.type", "use type: atm")
    sizes = options.task_classes or (decode_head.num_classes,)
    if sum(sizes) > decode_head.num_classes:
        raise SegcliError(f"task_classes {list(sizes)} add up to {sum(sizes)} classes but the dataset has "
                          f"{decode_head.num_classes}", "model.options.task_classes",
                          "the checkpoint or recipe belongs to another dataset")
    if sizes == (decode_head.num_classes,):
        return ContinualSegmentor(backbone, [decode_head])
    ignore = decode_head.ignore_index
    heads = [
        ATMHead(decode_head.cfg, HeadContext(tuple(backbone.out_channels), tuple(backbone.out_strides), n, ignore))
        for n in sizes
    ]
    return ContinualSegmentor(backbone, heads)
