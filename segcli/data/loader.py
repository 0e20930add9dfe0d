"""Data loaders for an iteration-based trainer, deterministic by construction.

Training: the sample order is an endless stream of epochs, epoch ``e`` being the permutation
drawn from ``(seed, e)``; iteration ``i`` takes stream positions ``[i*B, (i+1)*B)`` (B = global
batch size) and slot ``s`` of that batch is augmented with a generator seeded by
``(seed, i, s, index)``. A batch is therefore a function of (seed, i) alone:

* the number of worker processes does not matter (workers only execute requests; the batch
  sampler runs in the main process and the DataLoader returns batches in request order);
* resuming at ``start_iter`` yields exactly the batches an uninterrupted run would have seen;
* under DDP, rank ``r`` of ``W`` takes slots ``[r*B/W, (r+1)*B/W)`` of the same global batch,
  so W processes with B/W samples each see exactly what one process with B sees.

Evaluation: batch size 1 (images keep their own sizes), rank ``r`` takes indices ``r::W``.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from ..errors import SegcliError
from .datasets import SampleKey

_SEED_MASK = (1 << 63) - 1  # numpy seeds must be non-negative


def collate(items: list[dict]) -> dict:
    """Stack samples: image ``[B, 3, H, W]``, label ``[B, H, W]``, index ``[B]`` (int64)."""
    return {
        "image": torch.stack([item["image"] for item in items]),
        "label": torch.stack([item["label"] for item in items]),
        "index": torch.tensor([item["index"] for item in items], dtype=torch.int64),
    }


def worker_init(worker_id: int) -> None:
    """Seed a worker's global RNGs from its torch seed (base seed + worker id) and keep OpenCV
    single-threaded (its thread pool would oversubscribe the cores the workers already use).

    The transforms draw only from explicit generators; this is a safety net for library code.
    """
    import cv2

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    cv2.setNumThreads(1)


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one pass over the data."""
    return np.random.default_rng([seed & _SEED_MASK, 0, epoch]).permutation(num_samples)


def global_batch(num_samples: int, batch_size: int, seed: int, iteration: int) -> list[SampleKey]:
    """The ``batch_size`` samples of ``iteration`` with their augmentation entropy."""
    start = iteration * batch_size
    keys, epoch, order = [], None, None
    for slot in range(batch_size):
        position = start + slot
        if position // num_samples != epoch:
            epoch = position // num_samples
            order = epoch_permutation(num_samples, seed, epoch)
        index = int(order[position % num_samples])
        keys.append(SampleKey(index, (seed & _SEED_MASK, iteration, slot)))
    return keys


class TrainBatchSampler(Sampler):
    """Endless per-rank batches of :class:`SampleKey` from iteration ``start_iter`` on."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 start_iter: int = 0):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.per_rank = batch_size // world_size
        self.rank = rank
        self.start_iter = start_iter

    def __iter__(self):
        iteration = self.start_iter
        lo, hi = self.rank * self.per_rank, (self.rank + 1) * self.per_rank
        while True:
            yield global_batch(self.num_samples, self.batch_size, self.seed, iteration)[lo:hi]
            iteration += 1


class TrainBatches:
    """An endless iterator of training batches; ``iteration`` is the index of the next one."""

    def __init__(self, loader: DataLoader, start_iter: int):
        self.loader = loader
        self.iteration = start_iter
        self._iterator = None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            self._iterator = iter(self.loader)
        batch = next(self._iterator)
        self.iteration += 1
        return batch

    def close(self) -> None:
        """Stop the worker processes (they also stop when this object is garbage collected)."""
        self._iterator = None


def _check_ranks(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad rank {rank} of world size {world_size}")


def build_train_loader(dataset, batch_size: int, num_workers: int, seed: int, rank: int = 0,
                       world_size: int = 1, start_iter: int = 0, pin_memory: bool = False) -> TrainBatches:
    """Endless training batches ``dict(image [b, 3, H, W], label [b, H, W], index [b])``.

    ``batch_size`` is global; each of the ``world_size`` processes gets ``batch_size //
    world_size`` samples. Batch ``i`` depends only on (seed, i); see the module docstring.
    """
    _check_ranks(rank, world_size)
    if batch_size % world_size:
        raise SegcliError(f"batch size {batch_size} is not divisible by {world_size} processes",
                          "data.batch_size", f"use a multiple of {world_size}")
    if len(dataset) == 0:
        raise SegcliError("the training set is empty", getattr(dataset, "name", None))
    sampler = TrainBatchSampler(len(dataset), batch_size, seed, rank, world_size, start_iter)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        worker_init_fn=worker_init if num_workers > 0 else None,
        generator=torch.Generator().manual_seed((seed * 1000003 + rank) & _SEED_MASK),
        pin_memory=pin_memory,
        persistent_workers=False,
    )
    return TrainBatches(loader, start_iter)


def build_eval_loader(dataset, num_workers: int, rank: int = 0, world_size: int = 1,
                      pin_memory: bool = False) -> DataLoader:
    """Batches of one image ``dict(image [1, 3, H, W], label [1, H, W], index [1])``, indices ``rank::world_size``."""
    _check_ranks(rank, world_size)
    return DataLoader(
        dataset,
        batch_size=1,
        sampler=list(range(rank, len(dataset), world_size)),
        num_workers=num_workers,
        collate_fn=collate,
        worker_init_fn=worker_init if num_workers > 0 else None,
        pin_memory=pin_memory,
    )
