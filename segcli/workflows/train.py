"""Training a recipe into a work dir (``segcli train``), and the run set-up that ``cl-step`` shares.

:func:`distributed_run` picks the device and joins the torchrun process group (if any) for the
length of a run; :func:`start_run` writes the run's ``recipe.yaml`` (rank 0) and hands over to the
engine's training loop. ``train`` and each continual-learning step are those two calls around
their own choice of data and model.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from ..build import as_recipe, build_datasets, build_model, dataset_meta, pick_device
from ..engine.distributed import DistInfo, barrier, cleanup, init_distributed
from ..engine.trainer import Callback, TrainResult, run_training
from ..recipe import Recipe, dump_recipe


@contextmanager
def distributed_run(device: str | None) -> Iterator[tuple[torch.device, DistInfo]]:
    """(device, process-group info) for one run; the group is left on exit, also on errors."""
    dev = pick_device(device)
    dist_info = init_distributed(dev)
    try:
        yield dev, dist_info
    finally:
        cleanup(dist_info)


def start_run(recipe: Recipe, model, train_set, val_set, work_dir: Path, meta: dict, device: torch.device,
              dist_info: DistInfo, resume: bool, callback: Callback | None) -> TrainResult:
    """Write ``work_dir/recipe.yaml`` (rank 0) and run the training loop into ``work_dir``."""
    if dist_info.is_main:
        work_dir.mkdir(parents=True, exist_ok=True)
        (work_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    return run_training(recipe, model, train_set, val_set, work_dir, meta, device, dist_info,
                        resume=resume, callback=callback)


def train(recipe: Recipe | str | Path, work_dir: str | Path | None = None, overrides=(), resume: bool = False,
          device: str | None = None, callback: Callback | None = None) -> TrainResult:
    """Train a recipe; writes ``last.pt``, ``best.pt``, ``metrics.jsonl`` and ``recipe.yaml`` to ``work_dir``
    (default ``runs/<recipe name>``). Events reach ``callback(event, info)`` (see ``engine/trainer.py``)."""
    recipe = as_recipe(recipe, overrides)
    work_dir = Path(work_dir or Path("runs") / recipe.name)
    with distributed_run(device) as (dev, dist_info):
        if not dist_info.is_main:  # rank 0 generates/caches data (e.g. the synthetic set) first
            barrier(dist_info)
        train_set, val_set = build_datasets(recipe)
        if dist_info.is_main:
            barrier(dist_info)
        torch.manual_seed(recipe.train.seed)  # the initial weights depend on the seed alone
        model = build_model(recipe, num_classes=train_set.num_classes)
        return start_run(recipe, model, train_set, val_set, work_dir, dataset_meta(train_set), dev, dist_info,
                         resume, callback)
