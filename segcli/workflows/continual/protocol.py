"""Continual-learning protocols: ``"A-B"`` -> the class ids of every task (thesis 4.3.6)."""
from __future__ import annotations

import re

from ...errors import SegcliError

Tasks = tuple[tuple[int, ...], ...]


def parse_protocol(protocol: str, num_classes: int, where: str = "cl.protocol") -> Tasks:
    """``"A-B"`` -> the class ids of every task: ``(0..A-1), (A..A+B-1), ...`` up to ``num_classes``."""
    match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", str(protocol))
    if match is None:
        raise SegcliError(f"protocol '{protocol}' is not of the form A-B", where,
                          "e.g. 100-50: 100 base classes, then tasks of 50 new classes")
    base, step = int(match.group(1)), int(match.group(2))
    if base < 1 or step < 1:
        raise SegcliError(f"protocol '{protocol}' needs at least one class per task", where)
    half = max(num_classes // 2, 1)
    example = f"e.g. {half}-{num_classes - half}" if num_classes > 1 else "a continual protocol needs 2+ classes"
    if base >= num_classes:
        raise SegcliError(f"protocol '{protocol}' starts with {base} classes but the dataset has {num_classes}",
                          where, f"the first task must leave classes for later tasks; {example}")
    rest = num_classes - base
    if rest % step:
        raise SegcliError(f"protocol '{protocol}': the {rest} classes after the first {base} do not split into "
                          f"tasks of {step}", where, f"choose B dividing {rest}, e.g. {base}-{rest}")
    tasks = [tuple(range(base))]
    tasks += [tuple(range(start, start + step)) for start in range(base, num_classes, step)]
    return tuple(tasks)


def seen_classes(tasks: Tasks, task: int) -> tuple[int, ...]:
    """The class ids learnt by the end of step ``task``: tasks 1..task."""
    return tuple(c for classes in tasks[:task] for c in classes)
