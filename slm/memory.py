"""Keep freed host memory mapped, so jitted CPU programs do not page-fault every call.

XLA's CPU runtime allocates each execution's temporaries with malloc and frees them after it.
glibc serves blocks this large with mmap (or from per-thread arenas it trims), so every call
gives them back to the kernel and then faults them in again, page by page: the 30M-parameter
benchmark's train step faulted ~1.5 GB and spent ~0.5-1 s of kernel time per step that way.
With one malloc arena, no mmap and no trimming, the second call reuses the first call's memory.
The cost is that the process keeps its peak heap until it exits, which is what a training or
serving process does anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_applied = False


def keep_freed_memory() -> bool:
    """Apply the malloc settings (glibc only; a no-op elsewhere). Returns whether they apply.

    Call it before JAX starts its threads (before the first computation): threads that already
    own a malloc arena keep it.
    """
    global _applied
    if _applied or not sys.platform.startswith("linux"):
        return _applied
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _applied = all(mallopt(param, value) == 1 for param, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))
    return _applied
