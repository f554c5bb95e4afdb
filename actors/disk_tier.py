"""Target layers left on disk when host memory is short: read per pass, one layer ahead.

Layers are read from the checkpoint by a background thread into a small ring of staging
buffers (page-locked on CUDA, so the copy to the GPU still runs at PCIe speed), laid out exactly
like the shared-memory files so the streamer treats a staged layer like any host layer. A
buffer is refilled only after its previous layer's copy (CUDA) or use (CPU) is finished.

A layer's first read goes through the source's `read_layer`, which checks dtype, shape and
finite values. Later passes read its bytes straight from the files into the staging buffer
(`pread` on several threads, no intermediate tensors) where the checkpoint stores them as the
layout has them (`Checkpoint.layer_extents`): on the H200 the checked path gave 1.5 tok/s
against 24.7 with every layer in host memory (GPU check, session 13), a few GB/s of copies,
stacks and finiteness checks per pass on one thread.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..errors import CheckpointError
from ..models.layers import layer_shapes
from ..sources.open import open_source
from .shm_layout import layout


CHUNK = 64 << 20  # bytes per pread: many in flight across the reader threads


class DiskTier:
    def __init__(self, source_desc, layers: list[int], cuda: bool, num_buffers: int = 2,
                 read_threads: int | None = None):
        self.source = open_source(source_desc)
        self.layers = list(layers)
        # Each layer's layout: one for all where they are alike, read apart where a model mixes
        # layer kinds (Qwen MoE's dense layers among sparse ones), and the buffers fit the largest.
        by_kind: dict[tuple, tuple[list, int]] = {}
        self.layouts: dict[int, tuple[list, int]] = {}
        checked = []
        for j in self.layers:
            kind = tuple(layer_shapes(self.source.spec, j).items())
            if kind not in by_kind:
                by_kind[kind] = layout(self.source.read_layer(j))
                checked.append(j)
            self.layouts[j] = by_kind[kind]
        total = max(t for _, t in self.layouts.values())
        self.bufs = [torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=cuda) for _ in range(num_buffers)]
        self.views = [memoryview(b.numpy()) for b in self.bufs]
        self.owner: list[int | None] = [None] * num_buffers
        self.reusable_after = [None] * num_buffers  # CUDA event: the buffer's last copy finished
        self.futures: dict[int, tuple[int, Future]] = {}
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="disk-tier")
        self.readers = ThreadPoolExecutor(max_workers=read_threads or min(8, os.cpu_count() or 1),
                                          thread_name_prefix="disk-read")
        self.extents: dict[int, dict | None] = {}  # layer -> its byte ranges, once read_layer checked it
        self.fds: dict = {}
        self.fd_lock = threading.Lock()
        for j in checked:  # read_layer just checked them
            self.extents[j] = self._direct(j)
        self.bytes_read = 0
        self.direct_reads = 0  # layers read straight from the files (not through read_layer)

    def _fill(self, j: int, b: int):
        ev = self.reusable_after[b]
        if ev is not None:
            ev.synchronize()
        buf, entries = self.bufs[b], self.layouts[j][0]
        ext = self.extents.get(j)
        if ext is not None:
            self._read_direct(b, entries, ext)
            self.direct_reads += 1
        else:
            tensors = self.source.read_layer(j)  # checked: dtype, shape, finite (models/weight_checks.py)
            own, total = layout(tensors)
            if own != entries:  # alike in shape, not in storage (an fp8 checkpoint's ignored modules)
                if total > buf.numel():  # the GPU slots were sized for the buffers: cannot grow
                    raise CheckpointError(f"disk layer {j} needs {total} bytes staged, more than the "
                                          f"{buf.numel()} its layer kind was given; keep it in host memory")
                self.layouts[j] = (entries := own, total)
            for e in entries:
                buf[e.offset: e.offset + e.nbytes].copy_(tensors[e.name].contiguous().view(-1).view(torch.uint8))
            self.extents[j] = self._direct(j)
        self.bytes_read += sum(e.nbytes for e in entries)

    def _direct(self, j: int) -> dict | None:
        """Layer j's byte ranges, where they are exactly the layout's entries; else None (the
        source is not a checkpoint, is quantized at load, or stores another dtype)."""
        fn = getattr(self.source, "layer_extents", None)
        ext = fn(j) if fn is not None else None
        entries = self.layouts[j][0]
        if ext is None or set(ext) != {e.name for e in entries}:
            return None
        if any(sum(n for _, _, n in ext[e.name]) != e.nbytes for e in entries):
            return None
        return ext

    def _fd(self, path) -> int:
        with self.fd_lock:
            if path not in self.fds:
                self.fds[path] = os.open(path, os.O_RDONLY)
            return self.fds[path]

    def _read_direct(self, b: int, entries: list, ext: dict):
        """Every range into its place in buffer b, CHUNK bytes per pread, on the reader threads."""
        jobs = []
        for e in entries:
            pos = e.offset
            for path, off, n in ext[e.name]:
                for i in range(0, n, CHUNK):
                    jobs.append((path, off + i, pos + i, min(CHUNK, n - i)))
                pos += n
        view = self.views[b]

        def read(job):
            path, off, dst, size = job
            fd, got = self._fd(path), 0
            while got < size:
                k = os.preadv(fd, [view[dst + got: dst + size]], off + got)
                if k <= 0:
                    raise CheckpointError(f"{path}: ended {size - got} bytes early at offset {off + got} "
                                          f"(changed since it was checked?)")
                got += k

        for f in [self.readers.submit(read, job) for job in jobs]:
            f.result()

    def close(self):
        self.pool.shutdown(wait=True)
        self.readers.shutdown(wait=True)
        with self.fd_lock:
            for fd in self.fds.values():
                os.close(fd)
            self.fds.clear()

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
        return self.bufs[b], self.layouts[j][0]

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
