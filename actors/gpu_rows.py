"""The executor's side of a batch's GPU rows (plan.gpu_kv_rows, placement/gpu_kv_rows.py).

Rows [0, g) of the batch keep their target K/V here, in device memory, for every layer. In a
verification pass the executor sends the CPU worker only the other rows' q/k/v, then attends
for these rows while the worker attends for the rest; the two outputs are joined in row order
before the layer's second half. The arithmetic is `models.attention`'s, as on the CPU.
"""

from __future__ import annotations

import torch

from ..models.attention import KVCache
from ..models.host_io import to_device


class GpuRows:
    def __init__(self, spec, rows: int, capacity: int, device, kv_dtype: str | None = None):
        """kv_dtype: plan.kv_dtype, the CPU worker's cache type (None: the model's)."""
        dtype = getattr(torch, kv_dtype) if kv_dtype else spec.torch_dtype
        self.cache = KVCache(spec.num_layers, rows, spec.num_kv_heads, spec.head_dim, capacity, dtype, device,
                             spec.sliding_windows)
        self.within = None  # (storage, first row): where `spare` rows lie in another batch's storage

    @classmethod
    def over(cls, cache: KVCache, within=None) -> "GpuRows":
        """GpuRows holding their rows in an existing cache (`spare`'s view), allocating nothing."""
        rows = cls.__new__(cls)
        rows.cache, rows.within = cache, within
        return rows

    @property
    def allocated(self) -> int:
        """Rows the storage holds: the rows the batch started with."""
        return self.cache._base[0][0].shape[0]

    def spare(self, n: int) -> "GpuRows":
        """The last n rows of this storage as GpuRows of their own, for rows about to join the
        batch (their prefill stores there; `append` then moves them next to the survivors).
        Nothing is allocated: a join's K/V never needs GPU memory beyond what the batch started
        with. The batch's own rows stay clear of them: they are at most `allocated` - n, and
        finished rows only move within them (`KVCache.select` in place)."""
        if not 0 < n <= self.allocated - self.rows:
            raise ValueError(f"{n} joining rows do not fit the {self.allocated - self.rows} free GPU rows")
        bk, bv = self.cache._base
        lo, hi = self.allocated - n, self.allocated
        lens = torch.zeros(n, dtype=self.cache.lens.dtype, device=self.cache.lens.device)
        return GpuRows.over(self.cache._like([t[lo:hi] for t in bk], [t[lo:hi] for t in bv], lens),
                             within=(self.cache._base, lo))

    @property
    def rows(self) -> int:
        return self.cache.batch

    def store_prefill(self, j: int, lo: int, k: torch.Tensor, v: torch.Tensor, prompt_lens=None):
        """Layer j's prefill K/V of a sub-batch whose first row is the batch's row lo, padded as
        [P, Hkv, longest, d]; its rows below g are kept. prompt_lens (the last layer): the
        sub-batch's prompt lengths, which become those rows' lengths."""
        n = min(k.shape[0], self.rows - lo)
        if n <= 0:
            return
        L = k.shape[2]
        self.cache.k[j][lo: lo + n, :, :L].copy_(k[:n])
        self.cache.v[j][lo: lo + n, :, :L].copy_(v[:n])
        if prompt_lens is not None:
            self.cache.lens[lo: lo + n] = to_device(list(prompt_lens[:n]), self.cache.lens.device, torch.long)

    def begin_pass(self, n_q: int):
        """A verification pass: every row gets n_q new tokens (k + 1)."""
        q_lens = torch.full((self.rows,), n_q, dtype=torch.long, device=self.cache.lens.device)
        self.cache.begin_pass(q_lens, self.rows * n_q, n_q)

    def attend(self, j: int, q, k, v) -> torch.Tensor:
        """The rows' packed q/k/v [rows * n_q, H, d] of layer j: append, attend -> [T, Hq * d]."""
        return self.cache.attend_layer(j, q, k, v)

    def finish_pass(self, n_q: int, counts):
        """After verification: keep the `counts` tokens each row's pass accepted of its n_q."""
        c = to_device(counts[: self.rows], self.cache.lens.device, torch.long)
        self.cache.advance()
        self.cache.truncate(self.cache.lens - n_q + c)

    def append(self, other: "GpuRows"):
        """Rows joining the batch (their prompts' K/V, stored by their own prefill) take the
        storage finished rows left, after this side's survivors. From `spare`: moved within
        the storage, lowest row first (a row is read before a later one overwrites it)."""
        c, n, m = self.cache, self.rows, other.rows
        bk, bv = c._base
        if other.within is None or other.within[0] is not c._base:  # rows of a storage of their own
            c.append(other.cache)
            return
        lo = other.within[1]
        if lo != n:
            for t in bk + bv:
                if n + m <= lo:  # apart: one copy
                    t[n:n + m].copy_(t[lo:lo + m])
                else:
                    for i in range(m):
                        t[n + i].copy_(t[lo + i])
        c.k, c.v = [t[:n + m] for t in bk], [t[:n + m] for t in bv]
        c.lens = torch.cat([c.lens, other.cache.lens])

    def keep(self, idx):
        """The surviving GPU rows in `fill_holes` order: compacts in place."""
        self.cache.select(idx)

