"""Host tensors asked for in 2 MiB pages (plan.kv_huge_pages): the CPU worker's KV cache.

CPU attention streams every row's K/V each layer (W4: ~30 GB of host KV a pass). In 4 KiB pages
the hardware prefetcher stops at each page's end and the TLB covers 2 MB per 512 entries; in
2 MiB pages neither. Linux gives anonymous memory huge pages where its transparent huge page
mode is "always" and memory is not too fragmented, or where the range was advised
(`madvise(MADV_HUGEPAGE)`) before its first touch, with "always" or "madvise" (then, with
defrag "madvise", the kernel compacts memory for it). torch allocates without advice, so a
tensor is advised here between `torch.empty` and its zeroing. What it gives is measured on the
GPU machine before it is a default (docs/benchmarks.md, W4 "Session 41": a run first in its
process was slower than a second, its CPU attention 18-28% longer).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux

_libc = None


def _madvise():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return _libc.madvise


def advise(t: torch.Tensor) -> int:
    """Ask for t's whole 2 MiB pages to come as huge pages; the bytes advised (0 off Linux or
    where the kernel refuses: then t is ordinary memory, as it would have been)."""
    if not sys.platform.startswith("linux") or t.device.type != "cpu":
        return 0
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    lo, hi = -(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE
    if hi <= lo:
        return 0
    return hi - lo if _madvise()(lo, hi - lo, MADV_HUGEPAGE) == 0 else 0


def zeros(shape, dtype: torch.dtype, device="cpu", huge: bool = False) -> torch.Tensor:
    """torch.zeros, its memory advised into huge pages first where `huge` and on the host."""
    if not huge or torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    t = torch.empty(shape, dtype=dtype)  # not touched yet: the advice decides its page size
    advise(t)
    return t.zero_()
