"""Data loaders for an iteration-based trainer, deterministic by construction.

Training: the sample order is an endless stream of epochs, epoch ``e`` being the permutation
drawn from ``(seed, e)``; iteration ``i`` takes stream positions ``[i*B, (i+1)*B)`` (B = global
batch size) and slot ``s`` of that batch is augmented with a generator seeded by
``(seed, i, s, index)``. A batch is therefore a function of (seed, i) alone:

* the number of worker processes does not matter (workers only execute requests; the batch
  sampler runs in the main process and the DataLoader returns batches in request order);
* resuming at ``start_iter`` yields exactly the batches an uninterrupted run would have seen;
* under DDP, rank ``r`` of ``W`` takes slots ``[r*B/W, (r+1)*B/W)`` of the same global batch,
  so W processes with B/W samples each see exactly what one process with B sees;
* with ``A`` accumulation steps, rank ``r``'s share is cut into ``A`` micro-batches of ``m =
  B/(W*A)`` consecutive slots, micro-batch ``j`` holding slots ``[r*B/W + j*m, r*B/W + (j+1)*m)``:
  B stays the global batch of one optimizer step (MMSegmentation's is ``gpus * samples_per_gpu``
  per step; accumulation only changes how many samples are in memory at once), and a run with
  any W and A sees exactly the samples and augmentations of one process with B.

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
    """Stack samples: image ``[B, 3, H, W]``, label ``[B, H, W]``, index ``[B]`` (int64). Samples
    without a mask (label ``None``: a split read with ``labelled=False``) give a batch without ``label``."""
    batch = {
        "image": torch.stack([item["image"] for item in items]),
        "index": torch.tensor([item["index"] for item in items], dtype=torch.int64),
    }
    if items[0]["label"] is not None:
        batch["label"] = torch.stack([item["label"] for item in items])
    return batch


def worker_init(worker_id: int) -> None:
    """Seed a worker's global RNGs from its torch seed (base seed + worker id) and keep OpenCV
    single-threaded (its thread pool would oversubscribe the cores the workers already use).

    The transforms draw only from explicit generators; this is a safety net for library code.
    Workers ignore SIGINT: a Ctrl-C in the terminal reaches the whole process group, and the
    training process decides when to stop (after the iteration under way, engine/trainer.py), so
    the workers must still serve it until then; they end with the loader.
    """
    import signal

    import cv2

    signal.signal(signal.SIGINT, signal.SIG_IGN)
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


def micro_batch_size(batch_size: int, world_size: int = 1, accum_steps: int = 1) -> int:
    """Samples per process per micro-batch: the global ``batch_size`` split over ``world_size``
    processes and ``accum_steps`` accumulation steps (refused when it does not divide)."""
    parts = world_size * accum_steps
    if batch_size % parts:
        raise SegcliError(f"data.batch_size {batch_size} (the global batch) is not divisible by {parts} = "
                          f"{world_size} process(es) x train.accum_steps {accum_steps}", "data.batch_size",
                          f"use a multiple of {parts}, or change train.accum_steps")
    return batch_size // parts


class TrainBatchSampler(Sampler):
    """Endless per-rank micro-batches of :class:`SampleKey` from optimizer step ``start_iter`` on
    (``accum_steps`` of them per step)."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 start_iter: int = 0, accum_steps: int = 1):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.micro = micro_batch_size(batch_size, world_size, accum_steps)
        self.accum_steps = accum_steps
        self.rank = rank
        self.start_iter = start_iter

    def __iter__(self):
        iteration = self.start_iter
        first = self.rank * self.micro * self.accum_steps  # rank r's share of the global batch
        while True:
            keys = global_batch(self.num_samples, self.batch_size, self.seed, iteration)
            for step in range(self.accum_steps):
                lo = first + step * self.micro
                yield keys[lo:lo + self.micro]
            iteration += 1


class TrainBatches:
    """An endless iterator of training micro-batches; ``iteration`` is the optimizer step of the next one."""

    def __init__(self, loader: DataLoader, start_iter: int, accum_steps: int = 1):
        self.loader = loader
        self.start_iter = start_iter
        self.accum_steps = accum_steps
        self.served = 0  # micro-batches returned so far
        self._iterator = None

    @property
    def iteration(self) -> int:
        return self.start_iter + self.served // self.accum_steps

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            self._iterator = iter(self.loader)
        batch = next(self._iterator)
        self.served += 1
        return batch

    def close(self) -> None:
        """Stop the worker processes (they also stop when this object is garbage collected)."""
        self._iterator = None


def _check_ranks(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad rank {rank} of world size {world_size}")


def build_train_loader(dataset, batch_size: int, num_workers: int, seed: int, rank: int = 0,
                       world_size: int = 1, start_iter: int = 0, pin_memory: bool = False,
                       accum_steps: int = 1) -> TrainBatches:
    """Endless training micro-batches ``dict(image [m, 3, H, W], label [m, H, W], index [m])``.

    ``batch_size`` is the global batch of one optimizer step; each of the ``world_size`` processes
    gets ``accum_steps`` micro-batches of ``m = batch_size / (world_size * accum_steps)`` samples
    per step (:func:`micro_batch_size`). Step ``i`` depends only on (seed, i); see the module
    docstring. ``start_iter`` counts optimizer steps.
    """
    _check_ranks(rank, world_size)
    micro_batch_size(batch_size, world_size, accum_steps)
    if len(dataset) == 0:
        raise SegcliError("the training set is empty", getattr(dataset, "name", None))
    sampler = TrainBatchSampler(len(dataset), batch_size, seed, rank, world_size, start_iter, accum_steps)
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
    return TrainBatches(loader, start_iter, accum_steps)


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
