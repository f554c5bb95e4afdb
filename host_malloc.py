"""Keep freed host memory in the process: glibc's malloc told to serve every allocation up to
32 MiB from its heaps (not a fresh mmap) and never to hand freed heap memory back to the kernel.

Why: the CPU attention worker allocates its temporaries anew for every layer (scores, the
grouped queries, SDPA's packing), and by default glibc maps each large one fresh and unmaps it
when freed, so the next layer's first touch of it faults again, page by page, on the threads the
layer chain waits for. glibc raises that threshold as it frees mapped chunks, so a fresh
process faults most: on W4 (one H100, session 44) the worker took 28.9 million minor faults in
the first run of a process, 21.5 million beyond its KV cache's first touch, and 7.5 million in
its second (the cache's alone), attending at 12.9 against 9.8 ms a layer. One W4-shaped layer
there faulted 4,057 pages by default and none with these settings, in 9.7-10.5 ms against
11.9-13.9.

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
