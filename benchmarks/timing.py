"""Wall-clock timing shared by the benchmark scripts."""
from __future__ import annotations

import statistics
import time


def timed(fn, repeats: int) -> tuple[float, float]:
    """(min, median) wall seconds of ``repeats`` calls of ``fn`` after one warm-up call.
    The minimum resists a busy machine: other processes only ever add time."""
    fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return min(runs), statistics.median(runs)
