"""Give big freed blocks back to the OS, so the daemon's RSS stays flat with 5-12 MP frames.

glibc serves blocks from 128 KB up with mmap, but after the first such block is freed it raises
that threshold (up to 32 MB) and from then on keeps 5-20 MB frames, maps and masks in its heaps,
one per thread that allocated them (OpenVINO callbacks, the result thread, the evidence writer). A
block freed by one thread then stays mapped in that thread's arena: measured at 5 MP, ~90 MB more
RSS than the same run with a fixed threshold. `tune_malloc` fixes the threshold (mmap for every block
>= 1 MB, returned to the OS on free) and caps the arenas. A page-fault per 4 KB of a fresh block is
the price: ~0.1 ms per MB, against inference times of 10-300 ms per frame.

Environment variables of glibc (MALLOC_MMAP_THRESHOLD_, MALLOC_ARENA_MAX) win: set them and this
module leaves that setting alone. Non-glibc systems: nothing happens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc malloc.h
M_ARENA_MAX = -8
MMAP_THRESHOLD = 1 << 20
ARENA_MAX = 4


def tune_malloc(mmap_threshold: int = MMAP_THRESHOLD, arena_max: int = ARENA_MAX) -> dict[str, int]:
    """Set what the environment did not; returns the settings applied (empty when none could be)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return {}
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied: dict[str, int] = {}
    for env, param, value in (("MALLOC_MMAP_THRESHOLD_", M_MMAP_THRESHOLD, mmap_threshold),
                              ("MALLOC_ARENA_MAX", M_ARENA_MAX, arena_max)):
        if os.environ.get(env):
            continue
        if mallopt(param, value) == 1:
            applied[env] = value
        else:
            log.debug("mallopt(%d, %d) refused", param, value)
    return applied
