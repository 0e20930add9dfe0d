"""Writing a dataset's documented layout from its raw download (``segcli data prepare``).

Order of work: plan and check the whole download (no write), check every output against the one
output rule (:mod:`segcli.outputs`: nothing inside SRC, no existing file replaced without
``overwrite``), then write each file atomically. ROOT/``segcli_prepare.json`` records what is
being prepared from where: a second run with the same dataset and SRC resumes, skipping the
outputs that exist (each was renamed into place complete), without ``overwrite``; with
``overwrite`` everything is written again. Label files are decoded and checked as they are
converted, so a bad one stops the run with the files before it complete and resumable.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..data.prepare import PREPARERS, Source, Step, write_step
from ..errors import SegcliError, did_you_mean
from ..outputs import check_outputs

MARKER = "segcli_prepare.json"


@dataclass
class PrepareResult:
    dataset: str
    root: Path  # what data.root should be
    data_types: tuple[str, ...]  # the data.type values that read it
    samples: dict[str, int]  # split folder or list -> samples
    written: int = 0
    skipped: int = 0  # outputs an earlier run completed
    notes: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # checks only (ADE20K)
    checked_only: bool = False  # the download is the layout already: nothing was to be written

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        """The ``data prepare --json`` object."""
        return {"ok": self.ok, "dataset": self.dataset, "root": str(self.root), "data_types": list(self.data_types),
                "samples": self.samples, "written": self.written, "skipped": self.skipped, "notes": self.notes,
                "problems": [{"where": where, "problem": problem} for where, problem in self.problems]}


def _marker(dataset: str, src: Path, complete: bool) -> Step:
    record = {"dataset": dataset, "source": str(src), "complete": complete}
    return Step(MARKER, str(src), text=json.dumps(record, indent=1) + "\n")


def _resumable(root: Path, dataset: str, src: Path) -> bool:
    """Whether ROOT holds an earlier run of this same preparation (its outputs are ours to skip)."""
    try:
        record = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("dataset") == dataset and record.get("source") == str(src)


def prepare_data(dataset: str, src: str | Path, out: str | Path | None = None, overwrite: bool = False,
                 copy: bool = False, progress: Callable[[int, int], None] | None = None) -> PrepareResult:
    """Write ``dataset``'s layout under ``out`` from the raw download ``src``; ADE20K is only checked.

    ``copy`` copies images instead of hard-linking them (links are the default where the file
    system allows: the images are not changed, only placed). ``progress(done, total)`` is called
    after each output file.
    """
    if dataset not in PREPARERS:
        raise SegcliError(f"unknown dataset '{dataset}'", "DATASET", did_you_mean(dataset, PREPARERS))
    src = Path(src).expanduser()
    if not src.exists():
        raise SegcliError("source not found", str(src),
                          "give the folder that holds the download (extracted, or its zips as downloaded)")
    src = src.resolve()
    plan = PREPARERS[dataset](src)
    result = PrepareResult(plan.dataset, plan.ready_root or src, plan.data_types, plan.samples, notes=plan.notes,
                           problems=plan.problems)
    if plan.ready_root is not None:  # the download is the layout: nothing to write
        result.checked_only = True
        if out is not None:
            result.notes.append(f"nothing written to {out}: set data.root to {plan.ready_root}")
        return result
    if out is None:
        raise SegcliError(f"{dataset} needs an output folder", "--out", "add --out ROOT (a folder outside SRC)")
    root = Path(out).expanduser().resolve()
    result.root = root
    resume = not overwrite and _resumable(root, plan.dataset, src)
    steps = [step for step in plan.steps if not (resume and (root / step.output).exists())]
    result.skipped = len(plan.steps) - len(steps)
    outputs = [root / step.output for step in steps] + ([] if resume else [root / MARKER])
    check_outputs(outputs, inputs=plan.inputs(), overwrite=overwrite, data_dirs=[src])
    if root.exists() and not root.is_dir():
        raise SegcliError("not a folder", str(root), "choose another --out")
    source = Source()
    try:
        write_step(_marker(plan.dataset, src, complete=False), root / MARKER, source, copy)
        for done, step in enumerate(steps, 1):
            write_step(step, root / step.output, source, copy)
            result.written += 1
            if progress is not None:
                progress(done, len(steps))
        write_step(_marker(plan.dataset, src, complete=True), root / MARKER, source, copy)
    finally:
        source.close()
    return result


__all__ = ["MARKER", "PrepareResult", "prepare_data"]
