"""Rows of a batch whose target KV lives on the GPU and whose attention runs there.

CPU attention bounds a verification pass's layer chain once the copy is fast (W4: 16.4 ms of
a 23.0 ms layer, docs/benchmarks.md "Session 20"). The first g rows of a batch keep their
target K/V in GPU memory instead (`Plan.gpu_kv_rows`): the executor attends for them while
the CPU worker attends for the rest, so the CPU's share of the chain shrinks by g / batch.

The GPU rows are always a prefix [0, g) of the batch, so the CPU worker's cache holds the
contiguous rows [g, batch) (its row i is the batch's g + i). The CPU rows are split into the
pass's micro-batches and the GPU rows ride with the first (`part_ranges`): they attend on the
GPU while the worker attends for that part's CPU rows, and the worker attends for one part
while the executor finishes another. A part of their own cost more than it saved: on W4 (24
GPU rows, two CPU parts) it added ~5 ms of executor work a layer, whose hand-offs are taken
one part at a time, while the worker waited 6 ms a layer for its q/k/v (docs/benchmarks.md,
"Session 23").
Rows never move between the two: when sequences finish, the survivors of each side compact
within that side (`keep_order`). Waiting requests that join a running batch take the GPU rows
its finished sequences freed first, up to the g it started with, and the CPU rows after that
(`merge_order`): in a job of many requests the GPU keeps its share of the attention from the
first pass to the last, not only for the first wave.
"""

from __future__ import annotations

import numpy as np

from .plan import split_range


def part_ranges(n: int, g: int, micro_batches: int) -> list[tuple[int, int]]:
    """The [lo, hi) row ranges a verification pass of n rows, the first g on the GPU, runs as:
    the CPU rows in `micro_batches` near-equal parts, the first part starting at row 0 so that
    it carries the GPU rows too."""
    if g >= n:
        return [(0, n)]
    parts = [(g + lo, g + hi) for lo, hi in split_range(n - g, micro_batches)]
    return [(0, parts[0][1])] + parts[1:]


def fill_holes(keep: list[int]) -> list[int]:
    """An order for the n surviving sequences in which each stays in its row if that row is
    below n, and the survivors from rows >= n move into the freed rows. Caches can then
    compact in place by copying only the moved rows (a host KV cache of several GB would
    otherwise be copied whole each time a sequence finishes)."""
    n = len(keep)
    movers = iter(i for i in keep if i >= n)
    alive = set(keep)
    return [i if i in alive else next(movers) for i in range(n)]


def keep_order(keep: list[int], g: int) -> list[int]:
    """The survivors' order (old row indices, ascending in `keep`): the GPU survivors first,
    then the CPU survivors, each side in `fill_holes` order within itself, so that both caches
    compact in place."""
    gpu = [i for i in keep if i < g]
    cpu = [i - g for i in keep if i >= g]
    return fill_holes(gpu) + [i + g for i in fill_holes(cpu)]


def merge_order(n: int, g: int, m: int, g_new: int) -> list[int] | None:
    """Rows joining a batch of n rows (the first g on the GPU): m rows whose first g_new are
    on the GPU. Each cache appends on its own side, so the merged batch is bid's GPU rows, the
    joining GPU rows, bid's CPU rows, the joining CPU rows; returned as indices into bid's rows
    followed by the joining ones (None when that is the plain concatenation)."""
    if g_new == 0 or g == n:
        return None
    return [*range(g), *range(n, n + g_new), *range(g, n), *range(n + g_new, n + m)]


def split_keep(idx, g: int) -> tuple[np.ndarray, np.ndarray, int]:
    """For a cache holder: `keep_order`'s indices -> (the GPU cache's, the CPU cache's own row
    indices, the new g). ValueError if a row would cross from one side to the other."""
    idx = np.asarray(idx, dtype=np.int64)
    g_new = int((idx < g).sum())
    gpu, cpu = idx[:g_new], idx[g_new:]
    if (gpu >= g).any() or (cpu < g).any():
        raise ValueError(f"keep order {idx.tolist()} moves rows across the GPU/CPU boundary at {g}")
    return gpu, cpu - g, g_new
