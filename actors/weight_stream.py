"""Streaming target layers from page-locked host memory into rotating device slots.

Copies run on their own CUDA stream; compute waits on a per-slot "loaded" event and a copy
into a slot waits on that slot's "released" event, so the next layers load while the
current one computes (double buffering, or more slots). On the CPU the host views are used
in place and nothing is copied: the same calls, no transfers.
"""

from __future__ import annotations


import torch

from .shm_layout import views


class WeightStreamer:
    def __init__(self, host: dict[int, tuple], order: list[int], num_slots: int, device, timer=None, disk=None,
                 chunk_bytes: int = 64 << 20):
        """host: layer -> (flat uint8 host buffer, entries); order: layers streamed per pass;
        timer: a StageTimer that records each copy as a "weight_copy" span; disk: a DiskTier
        for the layers of `order` that are not in `host`; chunk_bytes: one layer is copied as
        pieces of this size (see `_issue`)."""
        self.host, self.order, self.timer, self.disk = host, list(order), timer, disk
        self.chunk = max(int(chunk_bytes), 1 << 20)
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.slot_of: dict[int, int] = {}  # layer -> slot holding (or loading) it
        self.bytes_copied = 0
        if not self.cuda or not self.order:
            self.nslots = 0
            return
        self.nslots = min(num_slots, len(self.order))
        sizes = [host[j][0].numel() for j in self.order if j in host]
        if disk is not None:
            sizes.append(disk.bufs[0].numel())
        nbytes = max(sizes)
        self.slots = [torch.empty(nbytes, dtype=torch.uint8, device=self.device) for _ in range(self.nslots)]
        self.copy_stream = torch.cuda.Stream(self.device)
        self.loaded = [None] * self.nslots
        self.released = [None] * self.nslots
        self.free = list(range(self.nslots))
        self._views = {}
        self._next = 0  # position in `order` of the next layer to load

    def _issue(self):
        """Start copies into every free slot, following the cyclic layer order."""
        while self.free and self.order:
            j = self.order[self._next % len(self.order)]
            if j in self.slot_of:
                break  # the whole cycle is already resident or loading
            s = self.free.pop(0)
            self._next += 1
            buf, entries = self._host(j)
            # Fresh events per copy: a slot is reused before its timing is read.
            start, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(self.copy_stream):
                if self.released[s] is not None:
                    self.copy_stream.wait_event(self.released[s])
                start.record(self.copy_stream)
                # In pieces: the copy engine runs copies in order, so a small host-to-device
                # copy of the compute stream (an attention output coming back) would otherwise
                # wait behind a whole 3 GB layer (measured on W1: the FFN stalled 25-47 ms).
                n = buf.numel()
                for o in range(0, n, self.chunk):
                    self.slots[s][o: min(n, o + self.chunk)].copy_(buf[o: o + self.chunk], non_blocking=True)
                done.record(self.copy_stream)
            self.loaded[s] = done
            if j not in self.host:  # a staged disk layer: its buffer frees once copied
                self.disk.done_with(j, done)
                self._prefetch_disk(j)
            if self.timer is not None:
                self.timer.add_pair("weight_copy", f"layer {j}", start, done)
            self.bytes_copied += buf.numel()
            self.slot_of[j] = s
            self._views[j] = views(self.slots[s], entries)

    def acquire(self, j: int) -> dict[str, torch.Tensor]:
        """Layer j's tensors on the device; compute issued after this waits for its copy."""
        if not self.cuda:
            return views(*self._host(j))
        if j not in self.slot_of:
            # Out of cyclic order (a new pass starting elsewhere): restart the cycle at j.
            self._next = self.order.index(j)
            self._issue()
        if j not in self.slot_of:
            raise RuntimeError(f"layer {j} requested while every slot holds a layer in use")
        s = self.slot_of[j]
        torch.cuda.current_stream(self.device).wait_event(self.loaded[s])
        return self._views[j]

    def release(self, j: int):
        """Layer j is done for this pass: its slot may be refilled once queued compute ends."""
        if not self.cuda:
            if j not in self.host:
                self.disk.done_with(j)
                self._prefetch_disk(j)
            return
        s = self.slot_of.pop(j)
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        self.released[s] = ev
        self.free.append(s)
        del self._views[j]
        self._issue()

    def prefetch(self):
        if self.cuda:
            self._issue()

    def _host(self, j: int):
        if j in self.host:
            return self.host[j]
        out = self.disk.get(j)
        return out

    def _prefetch_disk(self, j: int):
        n = self.disk.next_after(j, self.order)
        if n is not None:
            self.disk.prefetch(n)
