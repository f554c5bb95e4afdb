"""Keep freed host memory in the process: glibc's malloc told to serve every allocation up to
32 MiB from its heaps (not a fresh mmap) and never to hand freed heap memory back to the kernel.

Why: the CPU attention worker allocates its temporaries anew for every layer (scores, the
grouped queries, SDPA's packing), and by default glibc maps each large one fresh and unmaps it
when freed, so the next layer's first touch of it faults again, page by page, on the threads the
layer chain waits for. On W4 (one H100, session 44) the worker took 28.9 million minor faults in
its first run of a process and 7.5 million in its second (~30 and ~8 MB a layer call), attending
at 12.9 against 9.8 ms a layer. The same layer on this repository's 2-core development machine
(batch 48, 64/8 heads, 5 queries over 640 keys) faulted ~10 MiB every other layer call and none
with these settings.

glibc only (`mallopt`); elsewhere nothing changes and `keep_freed_memory` says so. Allocations
over 32 MiB (glibc's largest mmap threshold: the KV cache's per-layer tensors) are still mapped.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD_MAX = 32 << 20  # glibc refuses a larger one on 64-bit
KEEP_TRIM = (1 << 31) - 1  # an int's largest: heap tops are never trimmed back in practice

_applied: bool | None = None


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Apply the settings to this process (once; later calls say what the first did). True
    where glibc took both."""
    global _applied
    if _applied is None:
        libc = _libc()
        mallopt = getattr(libc, "mallopt", None) if libc is not None else None
        _applied = bool(mallopt and mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
                        and mallopt(M_TRIM_THRESHOLD, KEEP_TRIM) == 1)
    return _applied
