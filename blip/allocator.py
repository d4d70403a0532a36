"""Keep freed memory in the process, so large tensors are reused instead of faulted in again.

A sampled predict allocates and frees tensors of several MiB (K replicas x edges x channels)
many times per call. With glibc's defaults freed memory at the top of the heap goes back to
the operating system, and the next allocation of the same size faults every page in again (the
kernel zeroes it): on one CPU thread that made a K = 16 predict 1.2x (8 acetylacetone molecules)
to 1.4x (a 64-atom Si cell) slower (docs/results/cost/README.md, "keep freed memory"). ``blip`` commands call
:func:`keep_freed_memory` at start; Python callers (an ASE script) may call it themselves.
The price: the process keeps up to ``trim_threshold`` of freed memory after a peak.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

ENV_SWITCH = "BLIP_KEEP_FREED_MEMORY"  # "0" leaves the C allocator as it is
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
MIB = 1024 * 1024


@functools.lru_cache(maxsize=None)
def _glibc():
    """The process's C library when it is glibc (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None  # musl and others: no glibc tunables
    return libc


def keep_freed_memory(mmap_threshold: int = 32 * MIB, trim_threshold: int = 1024 * MIB) -> bool:
    """Serve blocks up to ``mmap_threshold`` bytes from the heap and keep up to ``trim_threshold``
    bytes of freed heap (glibc ``mallopt``). Returns whether the settings took effect: False off
    glibc, or with the environment variable ``BLIP_KEEP_FREED_MEMORY=0``."""
    if os.environ.get(ENV_SWITCH, "1").strip() == "0":
        return False
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold))) and \
        bool(libc.mallopt(M_TRIM_THRESHOLD, int(trim_threshold)))


def release_freed_memory() -> bool:
    """Give freed heap memory back to the operating system now (glibc ``malloc_trim``), e.g.
    before measuring a peak of resident memory. Returns False off glibc."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
