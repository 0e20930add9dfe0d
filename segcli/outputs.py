"""The one rule for every file a command writes.

1. No output may be an input of the same command (an image being predicted, the checkpoint being
   pruned, exported or converted): refused even with ``overwrite``, because the input is the user's
   and would be gone before the command could fail.
2. No output may lie inside a folder the command reads as data (a dataset's image and mask
   folders): a stray file there becomes a sample without a mask.
3. No existing file is replaced without ``overwrite``.

Every command checks all its outputs with :func:`check_outputs` *before* its first write, so a
refusal leaves nothing half-written. Paths are compared resolved (symlinks, ``..``, ``~``), so
two spellings of one file are one file.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .errors import SegcliError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")  # what cv2.imwrite can write


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_outputs(outputs: Iterable[str | Path], inputs: Iterable[str | Path] = (), overwrite: bool = False,
                  data_dirs: Iterable[str | Path] = (), option: str = "--out", suffixes: tuple[str, ...] = (),
                  input_name: str = "input") -> None:
    """Raise :class:`SegcliError` if writing ``outputs`` would break the rule (module docstring).

    ``inputs`` are the files the command reads; ``data_dirs`` the folders it reads as data;
    ``option`` names the flag that chose the outputs (for the message); ``suffixes``, when given,
    are the file extensions an output may have (e.g. an image writer's ``.png``); ``input_name``
    says what the inputs are ("input image", "checkpoint").
    """
    outputs = [Path(path).expanduser() for path in outputs]
    read = {_resolved(path) for path in inputs}
    folders = [_resolved(folder) for folder in data_dirs]
    for path in outputs:
        resolved = path.resolve()
        if suffixes and path.suffix.lower() not in suffixes:
            raise SegcliError(f"an output of this command must end in {' or '.join(suffixes)}", str(path),
                              f"choose another {option}")
        if resolved in read:
            raise SegcliError(f"this {input_name} would be overwritten by an output of the command", str(path),
                              f"choose another {option}; inputs are never overwritten, not even with --overwrite")
        for folder in folders:
            if _inside(resolved, folder):
                raise SegcliError(f"this output is inside the dataset folder {folder}", str(path),
                                  f"choose an {option} outside the dataset; a file there would be read as data")
    existing = [path for path in outputs if path.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise SegcliError(f"this output exists already{more}, from an earlier run?", str(existing[0]),
                          f"pass --overwrite to replace it, or choose another {option}")
