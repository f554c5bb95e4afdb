"""Streaming target layers from page-locked host memory into rotating device slots.

Copies run on their own CUDA stream; compute waits on a per-slot "loaded" event and a copy
into a slot waits on that slot's "released" event, so the next layers load while the
current one computes (double buffering, or more slots). On the CPU the host views are used
in place and nothing is copied: the same calls, no transfers.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections import deque

import torch

from ..errors import CapacityError
from ..models.cuda_streams import WEIGHT_COPY, side_stream
from .shm_layout import views


class WeightStreamer:
    def __init__(self, host: dict[int, tuple], order: list[int], num_slots: int, device, timer=None, disk=None,
                 chunk_bytes: int = 64 << 20, depth: int = 4):
        """host: layer -> (flat uint8 host buffer, entries); order: layers streamed per pass;
        timer: a StageTimer that records each copy as a "weight_copy" span; disk: a DiskTier
        for the layers of `order` that are not in `host`; chunk_bytes, depth: a layer is
        copied as pieces of this size, at most `depth` of them queued at a time (see `_feed`)."""
        self.host, self.order, self.timer, self.disk = host, list(order), timer, disk
        self.chunk = max(int(chunk_bytes), 1 << 20)
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:
            # The feeder thread selects the device by index ("cuda" alone names none).
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.slot_of: dict[int, int] = {}  # layer -> slot holding (or loading) it
        self.in_use: set[int] = set()  # acquired and not yet released
        self.bytes_copied = 0
        self.streaming = self.cuda and bool(self.order)  # nothing to copy on a CPU or with every layer resident
        # On a CPU nothing is copied, but the slots are still accounted for (which layer each
        # holds, in the same cyclic order), so a pass that holds a layer too long fails there
        # as it would on a GPU instead of only on the GPU machine.
        self.ledger = not self.cuda and bool(self.order) and num_slots > 0
        if not self.streaming:
            self.nslots = min(num_slots, len(self.order)) if self.ledger else 0
            self.free, self._next = list(range(self.nslots)), 0
            return
        self.nslots = min(num_slots, len(self.order))
        sizes = [host[j][0].numel() for j in self.order if j in host]
        if disk is not None:
            sizes.append(disk.bufs[0].numel())
        nbytes = max(sizes)
        try:
            self.slots = [torch.empty(nbytes, dtype=torch.uint8, device=self.device) for _ in range(self.nslots)]
        except torch.OutOfMemoryError as e:
            raise CapacityError(
                f"{self.nslots} weight slots of {nbytes / 2**30:.2f} GiB do not fit in the GPU memory left "
                f"(resident layers and globals take the rest): lower num_slots or the resident layers, or "
                f"raise gpu_memory ({str(e).splitlines()[0]})") from None
        self.copy_stream = side_stream(WEIGHT_COPY, self.device)
        self.loaded: list = [None] * self.nslots  # the _Copy that last filled each slot
        self.released = [None] * self.nslots
        self.free = list(range(self.nslots))
        self._views = {}
        self._next = 0  # position in `order` of the next layer to load
        self.depth = depth
        self._jobs: queue.Queue = queue.Queue()
        # The executor's thread holds the GIL between torch calls; a short switch interval
        # lets the feeder top up the copy engine's queue in time.
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
        self._feeder = threading.Thread(target=self._feed, name="weight-copy-feeder", daemon=True)
        self._feeder.start()

    def set_chunk(self, chunk_bytes: int):
        """The piece size for layers the feeder starts from now on (it reads it per layer)."""
        self.chunk = max(int(chunk_bytes), 1 << 20)

    def _issue(self):
        """Queue copies into every free slot, following the cyclic layer order."""
        while self.free and self.order:
            j = self.order[self._next % len(self.order)]
            if j in self.slot_of:
                break  # the whole cycle is already resident or loading
            s = self.free.pop(0)
            self._next += 1
            if not self.cuda:  # the CPU's ledger: the slot is taken, nothing copied
                self.slot_of[j] = s
                continue
            buf, entries = self._host(j)
            job = _Copy(j, s, buf, self.released[s] or ())
            self.loaded[s] = job
            self.bytes_copied += buf.numel()
            self.slot_of[j] = s
            self._views[j] = views(self.slots[s], entries)
            self._jobs.put(job)

    def _feed(self):
        """The copy feeder thread. It issues each layer as pieces with at most `depth` of
        them queued on the copy engine: the engine runs host-to-device copies in the order
        they were queued, whatever the stream, so a small copy of the compute stream (an
        attention output coming back) waits behind whatever is queued ahead of it; a whole
        3 GB layer queued at once made the FFN after it stall 25-47 ms (W1 trace)."""
        torch.cuda.set_device(self.device)
        in_flight: deque = deque()
        while True:
            job = self._jobs.get()
            try:
                with torch.cuda.stream(self.copy_stream):
                    for ev in job.released:
                        self.copy_stream.wait_event(ev)
                    job.start.record(self.copy_stream)
                    n, dst = job.buf.numel(), self.slots[job.slot]
                    chunk = self.chunk  # once per layer: set_chunk may change it meanwhile
                    for o in range(0, n, chunk):
                        while len(in_flight) >= self.depth:
                            in_flight.popleft().synchronize()  # releases the GIL while it waits
                        dst[o: min(n, o + chunk)].copy_(job.buf[o: o + chunk], non_blocking=True)
                        ev = torch.cuda.Event()
                        ev.record(self.copy_stream)
                        in_flight.append(ev)
                    job.done.record(self.copy_stream)
                if job.layer not in self.host:  # a staged disk layer: its buffer frees once copied
                    self.disk.done_with(job.layer, job.done)
                    self._prefetch_disk(job.layer)
            except BaseException as e:  # surfaced to the executor by acquire()
                job.error = e
            job.issued.set()

    def acquire(self, j: int) -> dict[str, torch.Tensor]:
        """Layer j's tensors on the device; compute issued after this waits for its copy."""
        if not self.cuda:
            if self.ledger:
                self._take(j)
            return views(*self._host(j))
        self._take(j)
        job = self.loaded[self.slot_of[j]]
        while not job.issued.wait(timeout=1.0):  # every piece is queued (the last ones still copying)
            if not self._feeder.is_alive():
                raise RuntimeError(f"the weight copy thread died before layer {j} was copied")
        if job.error is not None:
            raise RuntimeError(f"copying layer {j} to the device failed: {job.error}") from job.error
        if not job.timed and self.timer is not None:
            self.timer.add_pair("weight_copy", f"layer {j}", job.start, job.done)
            job.timed = True
        torch.cuda.current_stream(self.device).wait_event(job.done)
        return self._views[j]

    def pieces_pending(self, j: int) -> bool:
        """Whether layer j's copy has more than `depth` pieces left to queue: `acquire(j)` would
        block this thread (~depth pieces' time or more). False off CUDA, or j not yet loading."""
        if not self.cuda or j not in self.slot_of:
            return False
        return not self.loaded[self.slot_of[j]].issued.is_set()

    def _take(self, j: int):
        """Layer j must be in a slot (loaded or loading); it is in use until `release`."""
        if j not in self.slot_of:
            # Out of cyclic order (a new pass starting elsewhere): restart the cycle at j.
            self._next = self.order.index(j)
            self._issue()
        if j not in self.slot_of:
            raise RuntimeError(f"layer {j} requested while every slot holds a layer in use "
                               f"(slots hold {sorted(self.slot_of)})")
        self.in_use.add(j)

    def release(self, j: int, also=None):
        """Layer j is done for this pass: its slot may be refilled once queued compute ends.
        also: an event recorded after work on another stream that read the layer (rows joining
        the pass prefill on a stream of their own), which the copy into the slot waits for too."""
        self.in_use.discard(j)
        if not self.cuda:
            if j not in self.host:
                self.disk.done_with(j)
                self._prefetch_disk(j)
            if self.ledger:
                self.free.append(self.slot_of.pop(j))
                self._issue()
            return
        s = self.slot_of.pop(j)
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        self.released[s] = (ev,) if also is None else (ev, also)
        self.free.append(s)
        del self._views[j]
        self._issue()

    def prefetch(self):
        if self.streaming or self.ledger:
            self._issue()

    def reset(self):
        """Forget what the slots hold (a pass failed between acquire and release) and restart
        the cycle at its first layer, so the next pass finds free slots. Copies already queued
        into a slot finish before any new one into it starts (one copy stream, in order)."""
        self.in_use.clear()
        if self.ledger:
            self.free, self._next = list(range(self.nslots)), 0
            self.slot_of.clear()
            self._issue()
        if not self.streaming:
            return
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        for j, s in list(self.slot_of.items()):
            self.released[s] = (ev,)
            self.free.append(s)
        self.slot_of.clear()
        self._views.clear()
        self._next = 0
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


class _Copy:
    """One layer's copy into a slot, issued by the feeder thread."""

    def __init__(self, layer: int, slot: int, buf: torch.Tensor, released):
        self.layer, self.slot, self.buf, self.released = layer, slot, buf, released
        self.start, self.done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.issued = threading.Event()  # set once `done` is recorded (waiting on it is then valid)
        self.error: BaseException | None = None
        self.timed = False
