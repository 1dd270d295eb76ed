"""Host-side tuning for training on CPU.

glibc serves every allocation above 128 KiB (the default mmap threshold) with a fresh
mmap and returns it with munmap on free. A training step allocates and frees hundreds
of activation tensors of a few MB each, so every step page-faults and zeroes the same
memory again (the quickstart spent ~5% of its time in the kernel doing so). Raising the
mmap threshold to its 32 MiB maximum and the trim threshold keeps those blocks in the
heap for reuse: ~10% faster CPU steps. It only changes where memory comes from.

The price is a resident size that keeps freed blocks (up to the 1 GiB trim threshold), so
peak RSS overstates live memory. `FTL_KEEP_FREED_MEMORY=0` leaves glibc alone (with
`MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` set low, RSS then follows live memory
closely: bench/dist_memory.py measures that way).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's cap on 64-bit


def keep_freed_memory() -> bool:
    """Ask glibc to reuse freed activation memory; False where it does not apply."""
    if not sys.platform.startswith("linux") or os.environ.get("FTL_KEEP_FREED_MEMORY") == "0":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and friends: nothing to do
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(
        mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    )
