"""The class-presence index: which classes every training image holds, cached in segcli's cache.

Task membership under any protocol and setting is computed from it, so no mask is decoded twice
(cache location and invalidation key: see the package docstring).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...data.datasets import SegDataset, read_mask
from ...engine.checkpoint import write_atomically
from ...download import cache_dir

INDEX_VERSION = 1


@dataclass
class ClassPresence:
    """``matrix[i, c]``: training image i holds at least one pixel of class c (``[N, K]`` bool)."""

    matrix: np.ndarray
    path: Path  # where the cache lives
    reused: bool  # True when read from the cache, False when computed now


class _MaskClasses(torch.utils.data.Dataset):
    """Masks -> ``[K]`` bool presence rows (a torch Dataset so that workers can read in parallel)."""

    def __init__(self, masks: list[str], label_lut: np.ndarray | None, num_classes: int):
        self.masks, self.label_lut, self.num_classes = masks, label_lut, num_classes

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, index: int) -> torch.Tensor:
        label = read_mask(self.masks[index])
        if self.label_lut is not None:
            label = self.label_lut[label]
        counts = np.bincount(label.ravel(), minlength=256)  # [256]
        return torch.from_numpy(counts[: self.num_classes] > 0)  # [K]


def _fingerprint(dataset: SegDataset, root: Path) -> str:
    digest = hashlib.sha256()
    lut = None if dataset.label_lut is None else dataset.label_lut.tolist()
    digest.update(json.dumps({"version": INDEX_VERSION, "num_classes": dataset.num_classes, "lut": lut}).encode())
    for _, mask in dataset.samples:
        stat = os.stat(mask)
        digest.update(f"{os.path.relpath(mask, root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def presence_cache_path(root: Path, split: str) -> Path:
    """Where the index of ``split`` of the dataset at ``root`` is cached (never inside the dataset)."""
    key = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    return cache_dir() / "class_presence" / key / f"class_presence-{split}.npz"


def _read_cache(path: Path, fingerprint: str, shape: tuple[int, int]) -> np.ndarray | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["fingerprint"]) != fingerprint:
                return None
            matrix = np.unpackbits(data["packed"], axis=1, count=shape[1]).astype(bool)  # [N, K]
    except (OSError, KeyError, ValueError):
        return None
    return matrix if matrix.shape == shape else None


def _write_cache(path: Path, fingerprint: str, matrix: np.ndarray) -> None:
    write_atomically(path, lambda handle: np.savez_compressed(handle, fingerprint=np.array(fingerprint),
                                                              packed=np.packbits(matrix, axis=1)))


def class_presence(dataset: SegDataset, root: str | Path, split: str, num_workers: int = 0) -> ClassPresence:
    """Which classes every image of ``dataset`` holds, from the cache when it is still valid.

    ``root`` is the dataset folder (``data.root``) and ``split`` the split's directory name; see
    the module docstring for the cache location and its invalidation key.
    """
    root = Path(root)
    fingerprint = _fingerprint(dataset, root)
    shape = (len(dataset), dataset.num_classes)
    path = presence_cache_path(root, split)
    matrix = _read_cache(path, fingerprint, shape)
    if matrix is not None:
        return ClassPresence(matrix, path, reused=True)
    reader = _MaskClasses([mask for _, mask in dataset.samples], dataset.label_lut, dataset.num_classes)
    loader = torch.utils.data.DataLoader(reader, batch_size=32, num_workers=num_workers)
    matrix = torch.cat(list(loader)).numpy() if len(reader) else np.zeros(shape, dtype=bool)  # [N, K]
    try:
        _write_cache(path, fingerprint, matrix)
    except OSError:  # a read-only cache: computed, not kept
        pass
    return ClassPresence(matrix, path, reused=False)
