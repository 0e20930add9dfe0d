"""What every dataset preparer shares: a plan of output files, checked before anything is written,
and the atomic writer that carries it out.

A preparer reads the raw download (extracted, or the zips as downloaded, read in place through
:class:`Files` or :class:`Step` ``member``), checks its
structure (folders, split lists, every image paired with its annotation) and returns a
:class:`Plan`: one :class:`Step` per output file. Nothing is decoded while planning; each label
file is decoded, checked and converted when its output is written.

Each output is written to ``.<name>.part`` in its folder and renamed into place, so an output that
exists is complete: an interrupted run resumes by skipping the outputs that exist. The ``.part``
names end in no suffix a reader lists, so a leftover is never taken for a sample.
"""
from __future__ import annotations

import io
import os
import shutil
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from ...errors import SegcliError

DATASETS_EXTRA = "pip install 'segcli[datasets]'"  # what a missing optional package asks for

LabelConverter = Callable[[bytes, str], np.ndarray]  # (file bytes, file name for messages) -> uint8 [H, W]


@dataclass(frozen=True)
class Step:
    """One output file, ``output`` (relative to ROOT, '/'-separated), made from ``source``.

    ``source`` is a file, or with ``member`` a zip archive and the member to read. With ``convert``
    the source is an annotation, converted to a PNG of class ids; with ``text`` the output is that
    text (``source`` then only says where it came from); otherwise the file is placed as it is.
    """

    output: str
    source: str
    member: str | None = None
    convert: LabelConverter | None = None
    text: str | None = None


@dataclass
class Plan:
    """Everything a preparer decided before writing: the steps, what the prepared root is for
    (the recipe's ``data.type`` values and samples per split), and notes for the user."""

    dataset: str
    steps: list[Step]
    data_types: tuple[str, ...]
    samples: dict[str, int]
    notes: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (file or folder, what is wrong): checks only
    ready_root: Path | None = None  # set when the download is the layout already (nothing to write)

    def inputs(self) -> list[str]:
        return sorted({step.source for step in self.steps if step.text is None})


def require_scipy_loadmat():
    """``scipy.io.loadmat``, or the one-line error that says how to install it."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise SegcliError("reading MATLAB .mat annotations needs scipy", "scipy",
                          f"install it: {DATASETS_EXTRA}  (or: pip install scipy)") from None
    return loadmat


def mat_array(data: bytes, key: str, where: str) -> np.ndarray:
    """The 2-D integer array ``key`` of a MATLAB .mat file's bytes (v4-v7.2, what scipy reads)."""
    loadmat = require_scipy_loadmat()
    try:
        content = loadmat(io.BytesIO(data))
    except (ValueError, TypeError, OSError, NotImplementedError) as err:
        raise SegcliError(f"cannot read this .mat file ({err})", where,
                          "re-extract it from the original download") from None
    if key not in content:
        keys = ", ".join(sorted(k for k in content if not k.startswith("__")))
        raise SegcliError(f"no '{key}' array in this .mat file (it has: {keys or 'nothing'})", where,
                          "is this the annotation download the README names?")
    array = np.asarray(content[key])
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise SegcliError(f"'{key}' is a {array.dtype} array of shape {array.shape}; expected a 2-D map of "
                          "integer class ids", where, "re-extract it from the original download")
    return array


def apply_lut(ids: np.ndarray, lut: np.ndarray, valid: np.ndarray, where: str, what: str) -> np.ndarray:
    """``lut[ids]`` (uint8), after checking every id is one the table knows (``valid[id]``)."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= len(lut)):  # some ids fall outside the table
        inside = (ids >= 0) & (ids < len(lut))
        unknown = ~inside
        unknown[inside] = ~valid[ids[inside]]
    else:  # the common case: index the table directly, no masks
        unknown = ~valid[ids]
    if unknown.any():
        values = np.unique(ids[unknown])
        shown = ", ".join(str(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
        raise SegcliError(f"label values {shown} are not {what}", where,
                          "is this the annotation download the README names? re-extract it")
    return lut[ids]


def lookup_table(pairs: dict[int, int], size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(lut, valid)`` arrays of ``size`` entries from ``{raw id: written id}``."""
    lut = np.zeros(size, dtype=np.uint8)
    valid = np.zeros(size, dtype=bool)
    for raw, written in pairs.items():
        lut[raw], valid[raw] = written, True
    return lut, valid


def decode_png(data: bytes, where: str) -> np.ndarray:
    """A single-channel PNG's bytes -> its ``[H, W]`` array."""
    array = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None:
        raise SegcliError("cannot read this PNG (corrupt or not an image)", where,
                          "re-extract it from the original download")
    if array.ndim != 2:
        raise SegcliError(f"expected a single-channel PNG of ids, found {array.shape[2]} channels", where,
                          "use the *_gtFine_labelIds.png files, not the *_color.png renderings")
    return array


def list_names(path: Path, where: str | None = None) -> list[str]:
    """The non-empty lines of a split list (one sample name per line)."""
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise SegcliError("split list is empty", where or str(path), "re-extract it from the original download")
    return names


class Source:
    """Reads a step's source: a file, or a member of a zip archive kept open for the whole run."""

    def __init__(self):
        self._archives: dict[str, zipfile.ZipFile] = {}

    def open(self, step: Step):
        if step.member is None:
            return open(step.source, "rb")
        if step.source not in self._archives:
            self._archives[step.source] = zipfile.ZipFile(step.source)
        return self._archives[step.source].open(step.member)

    def read(self, step: Step) -> bytes:
        with self.open(step) as stream:
            return stream.read()

    def close(self) -> None:
        for archive in self._archives.values():
            archive.close()
        self._archives.clear()


class Files:
    """A download's files by path relative to one top folder: that folder extracted, or the
    members under ``prefix`` of the zip it came in. Planners list, pair and make steps through it
    without knowing which form the user has; the zip is read in place, never extracted.
    """

    def __init__(self, source: Path, names: list[str] | None, prefix: str | None = None):
        self.source = source  # the folder, or the zip archive
        self.prefix = prefix  # None: a folder; else the members' common start, e.g. "gtFine/"
        self._names = names  # a folder is listed on first use (a planner may only ask for some files)
        self._name_set: set[str] | None = None

    @classmethod
    def folder(cls, folder: Path) -> "Files":
        return cls(folder, None)

    @classmethod
    def archive(cls, archive: Path, prefix: str, expected: str) -> "Files":
        """The members of ``archive`` under ``prefix``; ``expected`` (the layout) is what errors ask for."""
        try:
            with zipfile.ZipFile(archive) as opened:
                members = opened.namelist()
        except (zipfile.BadZipFile, OSError) as err:
            raise SegcliError(f"cannot read this zip archive ({err})", str(archive),
                              "download it again (an interrupted download is not a whole archive)") from None
        names = sorted(name[len(prefix):] for name in members if name.startswith(prefix) and not name.endswith("/"))
        if not names:
            raise SegcliError(f"no {prefix} members in this archive", str(archive), f"expected {expected}")
        return cls(archive, names, prefix)

    def names(self) -> list[str]:
        """Every file's relative path ('/'-separated), sorted."""
        if self._names is None:
            self._names = sorted(path.relative_to(self.source).as_posix() for path in self.source.rglob("*")
                                 if path.is_file())
        return self._names

    def has(self, relative: str) -> bool:
        if self.prefix is None:
            return (self.source / relative).is_file()
        if self._name_set is None:
            self._name_set = set(self.names())
        return relative in self._name_set

    def read_text(self, relative: str) -> str:
        if self.prefix is None:
            return (self.source / relative).read_text()
        with zipfile.ZipFile(self.source) as archive:
            return archive.read(self.prefix + relative).decode()

    def step(self, output: str, relative: str, **kwargs) -> Step:
        if self.prefix is None:
            return Step(output, str(self.source / relative), **kwargs)
        return Step(output, str(self.source), member=self.prefix + relative, **kwargs)

    def where(self, relative: str) -> str:
        """A file (or folder) as the user would find it: ``SRC/part/x`` or ``SRC/part.zip:part/x``."""
        if self.prefix is None:
            return str(self.source / relative)
        return f"{self.source}:{self.prefix}{relative}"


def where(step: Step) -> str:
    """A step's source as the user would name it (``archive.zip:member``)."""
    return step.source if step.member is None else f"{step.source}:{step.member}"


def write_step(step: Step, target: Path, source: Source, copy: bool) -> None:
    """Write ``target`` completely under a temporary name, then rename it into place.

    Files placed as they are become hard links when ``copy`` is False and the file system allows
    it (no second copy of a 11 GB download); the rename replaces the link's directory entry, never
    the source's content, so nothing in the source can change through the output.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.parent / f".{target.name}.part"
    part.unlink(missing_ok=True)  # left by an interrupted run
    try:
        _write(step, part, source, copy)
        os.replace(part, target)
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:  # a member's data damaged (CRC) or cut short
        raise SegcliError(f"damaged archive member ({err})", where(step),
                          "download the archive again, then rerun the same command: it resumes") from None
    finally:
        part.unlink(missing_ok=True)


def _write(step: Step, part: Path, source: Source, copy: bool) -> None:
    """Write ``step``'s content to ``part`` (see :func:`write_step`)."""
    if step.text is not None:
        part.write_text(step.text)
    elif step.convert is not None:
        label = step.convert(source.read(step), where(step))  # [H, W] uint8 class ids
        ok, encoded = cv2.imencode(".png", label)
        if not ok:
            raise RuntimeError(f"PNG encoding failed for {where(step)}")
        part.write_bytes(encoded.tobytes())
    elif step.member is None and not copy:
        try:
            os.link(step.source, part)
        except OSError:  # another file system, or links not allowed: copy instead
            shutil.copyfile(step.source, part)
    else:
        with source.open(step) as stream, open(part, "wb") as out:
            shutil.copyfileobj(stream, out)
