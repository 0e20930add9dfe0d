"""Raw dataset downloads -> the layouts :mod:`segcli.data.datasets` reads (``segcli data prepare``).

One module per dataset; each turns the download into a :class:`~.common.Plan` of output files,
checked before anything is written. :data:`PREPARERS` is the one table of names (the recipe's
``data.type`` names, so the name a user prepares is the name the recipe uses).
"""
from __future__ import annotations

from .ade20k import check_ade20k
from .cityscapes import plan_cityscapes
from .coco_stuff import plan_coco_stuff10k
from .common import DATASETS_EXTRA, Plan, Source, Step, write_step
from .pascal_context import plan_pascal_context

PREPARERS = {  # data.type -> plan(src) (a module constant, never mutated)
    "ade20k": check_ade20k,
    "cityscapes": plan_cityscapes,
    "coco_stuff10k": plan_coco_stuff10k,
    "pascal_context": plan_pascal_context,
    "pascal_context_59": plan_pascal_context,  # one prepared root serves both
}

__all__ = ["DATASETS_EXTRA", "PREPARERS", "Plan", "Source", "Step", "write_step"]
