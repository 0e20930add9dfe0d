"""How this process's C allocator treats large freed blocks (glibc only; elsewhere a no-op).

Why: glibc serves every block above its mmap threshold (at most 32 MB) with a fresh ``mmap`` and
returns it with ``munmap`` on free. A segmentation forward at Cityscapes size frees and allocates
feature maps of 100+ MB per layer, so each one is mapped anew and the kernel faults and zeroes
it page by page: a third or more of a CPU forward's time is then kernel time, and training pays
it every iteration. :func:`retain_freed_memory` makes glibc serve large blocks from its heap and
keep freed ones for reuse (``M_MMAP_MAX = 0``, a 2 GB ``M_TRIM_THRESHOLD``), which removes that
kernel time (``benchmarks/nrd_vs_smp.py`` prints user and system seconds to see it).

Decisions:

* The CLI calls it once at start (``segcli`` is one job per process); library users opt in by
  calling it, since it changes the whole process. ``SEGCLI_ALLOCATOR=system`` keeps glibc's
  defaults, for a user who wants them (e.g. a long-lived process that must give memory back).
* The cost: the resident set does not shrink after a peak (freed memory stays in the heap for
  the next forward). Memory measurements call :func:`release_freed_memory` first, which hands
  free heap pages back (``malloc_trim``), so a peak is measured from what is really in use.
* Only ``mallopt`` / ``malloc_trim`` through ``ctypes``; nothing is preloaded and no environment
  variable of the allocator is set.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import lru_cache

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = (1 << 31) - 1  # mallopt takes an int: give back only a top chunk above ~2 GB
OPT_OUT_ENV = "SEGCLI_ALLOCATOR"


@lru_cache(maxsize=1)
def _glibc():
    """The C library if it is glibc (has ``mallopt`` and ``malloc_trim``), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


def retain_freed_memory() -> bool:
    """Serve large blocks from the heap and keep freed ones for reuse. True if applied (glibc and
    not opted out with ``SEGCLI_ALLOCATOR=system``)."""
    if os.environ.get(OPT_OUT_ENV, "").strip().lower() == "system":
        return False
    libc = _glibc()
    if libc is None:
        return False
    # mallopt returns 1 on success; a failure leaves glibc's defaults, which are correct, only slower
    return bool(libc.mallopt(M_MMAP_MAX, 0)) & bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (before measuring a peak of the resident set)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
