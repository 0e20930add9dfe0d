"""Where a training iteration's time goes on this machine: the data loader, the model step, both.

For a recipe (default: the quickstart), in one process:

* ``loader only`` - seconds per batch drawn from the training loader (the recipe's
  ``num_workers``, or ``--workers``), nothing else running;
* ``step only`` - forward + backward + optimizer step on one batch held in memory (no loader);
  also with the model and images channels-last (``--channels-last`` compares both layouts);
* ``loader + step`` - what ``segcli train`` runs: each step waits for its batch.

If ``loader + step`` is close to ``step only``, the loader never keeps the model waiting; if it
is close to their sum, loading and computing do not overlap (e.g. workers and compute threads
fight for the same cores). Random weights (``pretrained`` cleared); the data must exist (the
synthetic set is generated on first use).

    python benchmarks/train_step.py [RECIPE] [--iters 30] [--workers N] [--threads N] [--channels-last]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segcli.allocator import retain_freed_memory  # noqa: E402
from segcli.build import as_recipe, build_datasets, build_model, without_pretrained  # noqa: E402
from segcli.data import build_train_loader  # noqa: E402
from segcli.engine.optim import build_optimizer  # noqa: E402


def per_iter(fn, iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default="recipes/quickstart.yaml")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: the recipe's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--channels-last", action="store_true", help="also time the step channels-last")
    args = parser.parse_args()
    retain_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = without_pretrained(as_recipe(args.recipe))
    workers = recipe.data.num_workers if args.workers is None else args.workers
    (train_set,) = build_datasets(recipe, splits=("train",))
    batches = iter(build_train_loader(train_set, recipe.data.batch_size, workers, recipe.train.seed))
    torch.manual_seed(0)
    model = build_model(recipe, num_classes=train_set.num_classes).train()
    optimizer = build_optimizer(model, recipe.train.optimizer)
    held = next(batches)

    def step(batch, channels_last: bool = False) -> None:
        images = batch["image"]
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        sum(model(images, batch["label"]).values()).backward()
        optimizer.step()

    rows = [("loader only", per_iter(lambda: next(batches), args.iters))]
    rows.append(("step only", per_iter(lambda: step(held), args.iters)))
    rows.append(("loader + step", per_iter(lambda: step(next(batches)), args.iters)))
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
        rows.append(("step only, channels-last", per_iter(lambda: step(held, True), args.iters)))
        rows.append(("loader + step, channels-last", per_iter(lambda: step(next(batches), True), args.iters)))
    print(f"{args.recipe}: batch {recipe.data.batch_size}, crop {tuple(recipe.data.crop_size)}, {workers} workers, "
          f"{torch.get_num_threads()} threads, {args.iters} iterations each")
    for name, seconds in rows:
        print(f"{name:30s} {seconds * 1000:8.1f} ms / iteration")


if __name__ == "__main__":
    main()
