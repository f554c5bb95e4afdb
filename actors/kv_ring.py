"""The prefill's K/V from the executor to the CPU worker through a ring of shared-memory slots.

Each prefill call (one layer of one sub-batch) computes that sub-batch's K/V on the device, and
the CPU worker stores them in its cache. Through Ray's object store each call's K/V (W1: 33.5 MB)
was copied into pinned memory, then into the store, and the executor's next sub-batch started
only after that: sub-batches 27 ms apart against 15 ms of compute in W1's fp8 trace
(docs/benchmarks.md, "W1 with an fp8 target"). Here the executor DMAs them into a slot of a
page-locked /dev/shm file and returns a handle; the worker copies from the slot into its cache.

A batch's calls run in a fixed order, call c = layer x sub-batches + sub-batch, and call c writes
slot c % SLOTS. The slot is free once the worker has stored call c - SLOTS: the driver passes
that store's ref as an argument of call c (`ActorBackend._prefill_calls`), so Ray starts call c
only after it. One ring per batch (a joining batch's too); a finished batch's ring serves a later
one (`ExecutorMailboxes.free`).
"""

from __future__ import annotations

import os

import torch

from .shm_layout import ALIGN, SharedBuffer

KIND = "kv_ring"
SLOTS = 4  # calls in flight between the executor and the worker


def slot_of(call: int) -> int:
    return call % SLOTS


class KVRing(SharedBuffer):
    """SLOTS slots, each K then V of up to [rows, Hkv, tokens, d], contiguous, in one file."""

    what = "KV ring"

    def __init__(self, path: str, rows: int, tokens: int, spec, create: bool = False):
        self.rows, self.tokens = int(rows), int(tokens)
        self.shape = (spec.num_kv_heads, spec.head_dim)
        self.dtype = spec.torch_dtype
        n = self.rows * spec.num_kv_heads * self.tokens * spec.head_dim * torch.empty((), dtype=self.dtype).element_size()
        self.region = (n + ALIGN - 1) // ALIGN * ALIGN
        self._map(path, 2 * SLOTS * self.region, create, f"KV ring {path} is smaller than {rows} rows x {tokens} tokens")

    def view(self, slot: int, which: int, n: int, length: int) -> torch.Tensor:
        """K (which=0) or V (1) of `slot`, as a contiguous [n, Hkv, length, d]."""
        if not (0 <= slot < SLOTS and n <= self.rows and length <= self.tokens):
            raise ValueError(f"KV ring slot {slot} of {n} x {length} exceeds {SLOTS} x {self.rows} x {self.tokens}")
        start = (2 * slot + which) * self.region
        hkv, d = self.shape
        count = n * hkv * length * d
        return self.buf[start: start + self.region].view(self.dtype)[:count].view(n, hkv, length, d)

    def handle(self, slot: int, n: int, length: int) -> tuple:
        return (KIND, self.path, self.rows, self.tokens, slot, n, length)


def is_handle(kv) -> bool:
    return isinstance(kv, tuple) and len(kv) == 7 and kv[0] == KIND


def send(ring: KVRing, call: int, k: torch.Tensor, v: torch.Tensor) -> tuple:
    """Call `call`'s K/V [n, Hkv, L, d] into its slot, one DMA each on the current stream: the
    handle. The caller waits for the copies before it hands the handle on."""
    n, _, length, _ = k.shape
    slot = slot_of(call)
    ring.view(slot, 0, n, length).copy_(k, non_blocking=True)
    ring.view(slot, 1, n, length).copy_(v, non_blocking=True)
    return ring.handle(slot, n, length)


class RingReader:
    """The CPU worker's mappings of the executor's KV rings, by file. The executor keeps a
    finished batch's ring for the next (`ExecutorMailboxes.free`), so a mapping stays while
    its file does: mapping it again would fault in its pages again."""

    def __init__(self, spec):
        self.spec = spec
        self.maps: dict[str, tuple[KVRing, int]] = {}  # path -> (mapping, inode of the file mapped)

    def recv(self, handle) -> tuple[torch.Tensor, torch.Tensor]:
        _, path, rows, tokens, slot, n, length = handle
        ino = os.stat(path).st_ino
        held = self.maps.get(path)
        if held is None or held[1] != ino or held[0].rows < rows or held[0].tokens < tokens:
            if held is not None:
                held[0].close()
            self.maps[path] = held = (KVRing(path, rows, tokens, self.spec), ino)
        return held[0].view(slot, 0, n, length), held[0].view(slot, 1, n, length)

    def free(self, bid=None, idle: bool = False):
        """A batch is done with its ring: drop the mappings of files the executor removed, or
        (idle: no batch left here) every mapping, so no removed file's memory stays held."""
        for path in list(self.maps):
            try:
                gone = idle or os.stat(path).st_ino != self.maps[path][1]
            except FileNotFoundError:
                gone = True
            if gone:
                self.maps.pop(path)[0].close()

    def close(self):
        for ring, _ in self.maps.values():
            ring.close()
        self.maps.clear()

