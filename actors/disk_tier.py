"""Target layers left on disk when host memory is short: read per pass, one layer ahead.

Layers are read from the checkpoint (tensor by tensor, `safetensors.safe_open`) by a
background thread into a small ring of staging buffers (page-locked on CUDA, so the copy to
the GPU still runs at PCIe speed), laid out exactly like the shared-memory files so the
streamer treats a staged layer like any host layer. A buffer is refilled only after its
previous layer's copy (CUDA) or use (CPU) is finished.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..sources.open import open_source
from .shm_layout import layout


class DiskTier:
    def __init__(self, source_desc, layers: list[int], cuda: bool, num_buffers: int = 2):
        self.source = open_source(source_desc)
        self.layers = list(layers)
        first = self.source.read_layer(self.layers[0])
        self.entries, total = layout(first)
        self.bufs = [torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=cuda) for _ in range(num_buffers)]
        self.owner: list[int | None] = [None] * num_buffers
        self.reusable_after = [None] * num_buffers  # CUDA event: the buffer's last copy finished
        self.futures: dict[int, tuple[int, Future]] = {}
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="disk-tier")
        self.bytes_read = 0

    def _fill(self, j: int, b: int):
        ev = self.reusable_after[b]
        if ev is not None:
            ev.synchronize()
        buf, tensors = self.bufs[b], self.source.read_layer(j)
        for e in self.entries:
            buf[e.offset: e.offset + e.nbytes].copy_(tensors[e.name].contiguous().view(-1).view(torch.uint8))
        self.bytes_read += sum(e.nbytes for e in self.entries)

    def prefetch(self, j: int) -> bool:
        """Start reading layer j if a staging buffer is free; False if none is."""
        if j in self.futures:
            return True
        if None not in self.owner:
            return False
        b = self.owner.index(None)
        self.owner[b] = j
        self.futures[j] = (b, self.pool.submit(self._fill, j, b))
        return True

    def get(self, j: int) -> tuple[torch.Tensor, list]:
        """Layer j staged in host memory, as (flat buffer, entries); waits for the read."""
        if not self.prefetch(j):
            raise RuntimeError(f"disk layer {j} needed while every staging buffer is in use")
        b, fut = self.futures[j]
        fut.result()
        return self.bufs[b], self.entries

    def done_with(self, j: int, event=None):
        """Layer j's staged bytes are no longer needed once `event` (if any) completes."""
        b, _ = self.futures.pop(j)
        self.owner[b] = None
        self.reusable_after[b] = event

    def next_after(self, j: int, order: list[int]) -> int | None:
        """The first disk layer after j in the cyclic pass order."""
        i = order.index(j)
        for step in range(1, len(order) + 1):
            n = order[(i + step) % len(order)]
            if n in self.layers:
                return n
        return None
