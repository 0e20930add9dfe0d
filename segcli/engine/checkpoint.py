"""Checkpoints: atomic writes, ``weights_only=True`` reads, a self-describing payload.

A checkpoint is a dict: ``format`` ("segcli"), ``version``, ``recipe`` (the resolved recipe as
plain data, so the file alone rebuilds the model), ``meta`` (class names, palette, num_classes),
``model`` (state dict) and, for training checkpoints, ``optimizer``, ``scaler``, ``iteration``,
``best_miou`` and ``rng`` (torch CPU/CUDA generator states).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

import torch

from ..errors import SegcliError

FORMAT = "segcli"


def write_atomically(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """``write(handle)`` into a temp file beside ``path``, then rename it over ``path``: a reader
    never sees half a file, and an interrupted write leaves the old file (or none) in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(path: str | Path, payload: dict) -> Path:
    """Write ``payload`` to ``path`` atomically (temp file in the same folder + rename)."""
    return write_atomically(path, lambda handle: torch.save({"format": FORMAT, **payload}, handle))


def read_checkpoint(path: str | Path) -> dict:
    """Read a segcli checkpoint (``weights_only=True``); clear errors for missing/foreign files."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SegcliError("checkpoint not found", str(path), "check the path, or train one with `segcli train`")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise SegcliError(f"not a readable checkpoint ({err.__class__.__name__})", str(path),
                          "give a .pt written by segcli") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "recipe" not in payload:
        raise SegcliError("not a segcli checkpoint (no embedded recipe)", str(path),
                          "backbone weights go in model.backbone.pretrained of a recipe")
    return payload


def is_checkpoint_file(path: str | Path) -> bool:
    """Whether ``path`` is a file that ``torch.save`` wrote (a zip archive or a legacy pickle), by its
    first bytes: recipes are text, so a command that takes either can tell them apart unread."""
    path = Path(path).expanduser()
    if not path.is_file():
        return False
    with path.open("rb") as handle:
        head = handle.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


DEFAULT_MISMATCH_HINT = "use the recipe the checkpoint was trained with (it is embedded; omit --recipe)"


def load_model_state(model: torch.nn.Module, state: dict, source: str, hint: str = DEFAULT_MISMATCH_HINT) -> None:
    """``load_state_dict`` with a one-line error naming the mismatching keys; ``hint`` says what to
    do in the caller's terms (``eval`` has ``--recipe``, ``train --resume`` has not)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append("shape mismatch in " + ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                                                          for k in shapes[:3]))
        raise SegcliError("checkpoint does not fit the model: " + "; ".join(parts), source, hint)
    model.load_state_dict(state)
