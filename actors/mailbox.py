"""A pass's per-layer activations between the GPU executor and the CPU attention worker,
through a shared-memory buffer set up once per (batch, micro-batch) instead of Ray's object store.

Every layer of a verification pass sends q/k/v to the CPU worker (~28 MB for W1's 192
sequences x 12 tokens) and brings the attention output back (~19 MB). Through the object
store each direction is a copy into plasma, and the output takes one more copy into pinned
memory before it can go to the GPU; those copies widen the gaps around attention in a chain
that must fit under a layer's weight copy (docs/benchmarks.md, scripts/trace_layer_chain.py).

A `Mailbox` is one /dev/shm file with four regions (q, k, v, out), page-locked on the
executor: the executor DMAs q/k/v straight into it, the worker reads them in place and writes
its output into `out`, the executor DMAs that back. Ray carries only a small handle. Nothing
else keeps writer and reader apart, so the protocol relies on the pass's order:
- the worker reads q/k/v of layer j only after the executor's call that wrote them returned
  (the handle is that call's result), and is done with them when it returns its output;
- the executor writes layer j+1's q/k/v only after it consumed layer j's output, and it waits
  for its device stream (the copy of `out` to the GPU included) before returning that handle,
  so the worker's next write into `out` never races a DMA still reading it.
One mailbox serves one micro-batch of one batch; a pass with more tokens than it holds gets a
larger one (a new file), so handles name their file.
"""

from __future__ import annotations

import math
import os
import warnings
from itertools import accumulate
from pathlib import Path

import torch

from ..models.host_io import to_device, to_host
from . import doorbell
from .kv_ring import KVRing
from .shm_layout import ALIGN, SharedBuffer, device_view
from .wire import from_wire, to_wire

# A joining batch's prefill ring (W1-long: 16 rows x 1,024 tokens, 256 MiB) took ~60 ms to
# create and page-lock in the pass it rode, every join (session 37's trace: its layer 0 took
# 109 ms against 23, and the weight copy waited for that layer's slot). Rings are kept instead:
# SPARE_RINGS of them, sized up to a multiple of RING_TOKENS so that one serves most joins.
SPARE_RINGS = 2
RING_TOKENS = 256

KIND = "mailbox"


def _region_bytes(tokens: int, heads: int, head_dim: int, dtype: torch.dtype) -> int:
    n = tokens * heads * head_dim * torch.empty((), dtype=dtype).element_size()
    return (n + ALIGN - 1) // ALIGN * ALIGN


class Mailbox(SharedBuffer):
    """The doorbell's counters (actors/doorbell.py), then q [cap, Hq, d], k and v [cap, Hkv, d],
    out [cap, Hq*d], in one shared file."""

    what = "mailbox"

    def __init__(self, path: str, capacity: int, spec, create: bool = False):
        self.capacity = int(capacity)
        hq, hkv, d, dt = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.torch_dtype
        sizes = [_region_bytes(capacity, h, d, dt) for h in (hq, hkv, hkv, hq)]
        self._map(path, ALIGN + sum(sizes), create, f"mailbox {path} is smaller than a {capacity}-token mailbox")
        self.bell = doorbell.header(self.buf)
        self.seen = 0  # this side's count of hand-offs: q/k/v posted (executor) or consumed (worker)
        offs = [ALIGN + o for o in [0, *accumulate(sizes)]]
        shapes = [(capacity, hq, d), (capacity, hkv, d), (capacity, hkv, d), (capacity, hq * d)]
        self.q, self.k, self.v, self.out = (self.buf[o:o + s].view(dt)[: math.prod(sh)].view(sh)
                                            for o, s, sh in zip(offs, sizes, shapes))
        self._out_dev = None  # `out` as a CUDA view, made at its first `out_on`

    def close(self, unlink: bool = False):
        self.q = self.k = self.v = self.out = self.bell = self._out_dev = None
        super().close(unlink)

    def out_on(self, device) -> torch.Tensor:
        """`out` as a CUDA tensor over the same page-locked memory (`shm_layout.device_view`)."""
        if self._out_dev is None:
            self._out_dev = device_view(self.out, device)
        return self._out_dev

    def handle(self, tokens: int) -> tuple:
        return (KIND, self.path, self.capacity, tokens)


# -- the executor's side ----------------------------------------------------------------------
class ExecutorMailboxes:
    """The executor's mailboxes, one per (batch, micro-batch), grown as passes need."""

    def __init__(self, spec, folder: str | None, device: torch.device, doorbells: bool = False,
                 mapped_out: bool = False):
        self.spec, self.device = spec, device
        # plan.mapped_out: the attention output comes to the GPU as a kernel reads it from the
        # page-locked mailbox, not as a DMA that queues behind the weight copy's pieces
        self.mapped_out = mapped_out
        self.folder = Path(folder) if folder else None
        # plan.layer_doorbell: the pass's calls wait on the mailboxes' counters, so a mailbox
        # that cannot be page-locked is kept (a slower DMA) rather than given up for Ray's path.
        self.doorbells = doorbells
        self.boxes: dict[tuple, Mailbox | KVRing] = {}  # (batch, micro-batch) or (batch, "kv")
        self._gen = 0
        self._ring_failed = False
        self._spare_rings: list[KVRing] = []  # prefill rings of finished batches, page-locked, kept for the next
        self.bell_wait_s = 0.0  # time the executor spent waiting on doorbells
        # The worker's pid, written into each new mailbox: a worker that dies before it maps the
        # mailbox (and writes its pid there itself) would otherwise leave the executor waiting.
        self.worker_pid = 0

    def ensure(self, bid, p: int, tokens: int) -> Mailbox | None:
        """The mailbox for micro-batch p of batch bid, holding at least `tokens` (None: no folder,
        activations go through the object store). Call between passes: a mailbox it replaces
        must have no copy in flight."""
        if self.folder is None:
            return None
        box = self.boxes.get((bid, p))
        if box is not None and box.capacity >= tokens:
            return box
        cap = max(tokens, int(box.capacity * 1.5) if box else 0)
        if box is not None:
            box.close(unlink=True)
        self._gen += 1
        box = Mailbox(self.folder / f"act_b{bid}_p{p}_{self._gen}.bin", cap, self.spec, create=True)
        box.bell[doorbell.EXECUTOR_PID] = os.getpid()
        box.bell[doorbell.WORKER_PID] = self.worker_pid
        box = self._pinned(box, "activations", keep=self.doorbells)
        if box is None:
            self.boxes.pop((bid, p), None)
            self.folder = None
            return None
        self.boxes[(bid, p)] = box
        return box

    def _pinned(self, buf: SharedBuffer, what: str, keep: bool = False) -> SharedBuffer | None:
        """buf, page-locked on CUDA; None where that fails (the file removed, one warning):
        a DMA from unregistered memory is a slow copy staged by the driver that blocks this
        thread, and the object store's path (pinned staging) does better, so `what` goes that
        way from then on. keep: return buf unpinned instead (doorbells need the mailbox)."""
        if self.device.type != "cuda":
            return buf
        try:
            buf.register()
        except RuntimeError as e:
            if keep:
                warnings.warn(f"{what} copy from unpinned memory (slower): {e}", RuntimeWarning, stacklevel=3)
                return buf
            buf.close(unlink=True)
            warnings.warn(f"{what} go through Ray's object store: {e}", RuntimeWarning, stacklevel=3)
            return None
        return buf

    def ensure_ring(self, bid, rows: int, tokens: int) -> KVRing | None:
        """Batch bid's ring for its prefill K/V (actors/kv_ring.py), made at its first prefill
        call, or a spare one a batch before it left (`free`); None without a folder or where
        page-locking it failed (the object store then)."""
        if self.folder is None or self._ring_failed:
            return None
        ring = self.boxes.get((bid, "kv"))
        if ring is not None:
            return ring
        fits = [r for r in self._spare_rings if r.rows >= rows and r.tokens >= tokens]
        if fits:
            ring = min(fits, key=lambda r: r.rows * r.tokens)
            self._spare_rings.remove(ring)
        else:
            self._gen += 1
            # Named for this process, not the batch: a spare serves batches after the one that
            # made it, and a restarted executor's files never take a name the worker has mapped.
            path = self.folder / f"kv_ring_{os.getpid()}_{self._gen}.bin"
            ring = self._pinned(KVRing(path, rows, -(-tokens // RING_TOKENS) * RING_TOKENS, self.spec, create=True),
                                "prefill K/V")
            if ring is None:
                self._ring_failed = True
                return None
        self.boxes[(bid, "kv")] = ring
        return ring

    def send_qkv(self, box: Mailbox | None, q, k, v, sync) -> tuple:
        """q/k/v for the CPU worker: into the mailbox (one DMA each, then `sync`), or as wire arrays."""
        T = q.shape[0]
        if box is None:
            return tuple(to_wire(t) for t in to_host(q, k, v))
        box.q[:T].copy_(q, non_blocking=True)
        box.k[:T].copy_(k, non_blocking=True)
        box.v[:T].copy_(v, non_blocking=True)
        sync()
        box.seen += 1
        box.bell[doorbell.QKV] = box.seen  # after the data: the worker may read it from now on
        return box.handle(T)

    def recv_out(self, box: Mailbox | None, msg, tokens: int = 0) -> torch.Tensor:
        """The worker's attention output on the executor's device; `box`: the mailbox the
        q/k/v went out through (`send_qkv`'s), None for wire arrays. msg BELL: wait on the
        mailbox's doorbell for the output of the `tokens` posted last."""
        if msg == doorbell.BELL:
            if box is None:
                raise doorbell.PeerFailed("a doorbell hand-off needs a mailbox")
            self.bell_wait_s += doorbell.wait(box.bell, doorbell.OUT, box.seen, doorbell.WORKER_PID,
                                              "the GPU executor waiting for attention")
            msg = box.handle(tokens)
        if box is not None:
            if self.mapped_out and box.registered:
                # A copy engine runs host-to-device copies in the order they were queued, so a
                # DMA of the output waited behind the weight copy's queued pieces (~5 ms at 4 x
                # 64 MiB; session 37's w1-long trace: a part's FFN started 5.3 ms after its
                # attention while weights streamed, ~0 when they did not). A kernel's reads
                # across PCIe do not queue there. x * 1 is exact, and the stream sync before the
                # next layer's q/k/v go out keeps the worker's next write after this read.
                return box.out_on(self.device)[:msg[3]].mul(1)
            # On the CPU the caller consumes it before returning, before the worker writes again.
            return box.out[:msg[3]].to(self.device, non_blocking=True)
        return to_device(from_wire(msg), self.device)

    @staticmethod
    def out_arrived(box: Mailbox | None) -> bool:
        """Whether the worker's output for the q/k/v posted last through `box` is there (a
        doorbell's `recv_out` would not wait)."""
        return isinstance(box, Mailbox) and int(box.bell[doorbell.OUT]) >= box.seen

    def fail(self, bid):
        """The pass of batch bid failed here: the worker's queued calls for it stop waiting."""
        for key, box in self.boxes.items():
            if key[0] == bid and isinstance(box, Mailbox):
                doorbell.fail(box.bell)

    def free(self, bid):
        """Batch bid's mailboxes go; its prefill ring is kept as a spare for the next batch
        (its caller has made sure nothing reads or writes it any more)."""
        for key in [key for key in self.boxes if key[0] == bid]:
            box = self.boxes.pop(key)
            if isinstance(box, KVRing):
                self._spare_rings.append(box)
            else:
                box.close(unlink=True)
        while len(self._spare_rings) > SPARE_RINGS:  # the smallest go first
            small = min(self._spare_rings, key=lambda r: r.rows * r.tokens)
            self._spare_rings.remove(small)
            small.close(unlink=True)

    def drop_spares(self):
        """No batch left to serve (a run's end, or a wave's): the spare rings go."""
        for ring in self._spare_rings:
            ring.close(unlink=True)
        self._spare_rings.clear()

    def close(self):
        for box in [*self.boxes.values(), *self._spare_rings]:
            box.close(unlink=True)
        self.boxes.clear()
        self._spare_rings.clear()


# -- the CPU worker's side --------------------------------------------------------------------
class WorkerMailboxes:
    """The CPU worker's mappings of the executor's mailboxes, by file."""

    def __init__(self, spec):
        self.spec = spec
        self.maps: dict[str, Mailbox] = {}
        self.bell_wait_s = 0.0  # time the worker spent waiting on doorbells

    def recv_qkv(self, payload, bell: bool = False):
        """q, k, v (host tensors, read in place when they came through a mailbox). bell: the
        payload is the mailbox's from layer 0 of this pass; wait on its doorbell for the next."""
        if payload[0] == KIND:
            _, path, cap, T = payload
            box = self.maps.get(path)
            if box is None:
                # The executor made a new file for this micro-batch: forget the old mapping.
                stem = Path(path).name.rsplit("_", 1)[0]
                for old in [p for p in self.maps if Path(p).name.rsplit("_", 1)[0] == stem]:
                    self.maps.pop(old).close()
                box = self.maps[path] = Mailbox(path, cap, self.spec)
                box.bell[doorbell.WORKER_PID] = os.getpid()
            if bell:
                self.bell_wait_s += doorbell.wait(box.bell, doorbell.QKV, box.seen + 1, doorbell.EXECUTOR_PID,
                                                  "the CPU worker waiting for q/k/v")
                box.seen += 1
            else:  # the payload came with Ray's hand-off, after the executor posted it
                box.seen = int(box.bell[doorbell.QKV])
            return box.q[:T], box.k[:T], box.v[:T]
        if bell:
            raise doorbell.PeerFailed("a doorbell hand-off needs a mailbox")
        return tuple(from_wire(x) for x in payload)

    def fail(self, payload):
        """This side's attention failed: the executor's queued calls stop waiting."""
        if payload and payload[0] == KIND and payload[1] in self.maps:
            doorbell.fail(self.maps[payload[1]].bell)

    def out_buffer(self, payload) -> torch.Tensor | None:
        """Where attention may write its output directly ([T, Hq*d] in the mailbox), or None."""
        if payload[0] == KIND:
            _, path, _, T = payload
            return self.maps[path].out[:T]
        return None

    def send_out(self, payload, out: torch.Tensor):
        """The attention output back the way q/k/v came (no copy if it is already in `out_buffer`)."""
        if payload[0] == KIND:
            _, path, _, T = payload
            box = self.maps[path]
            dest = box.out[:T]
            if out.data_ptr() != dest.data_ptr():
                dest.copy_(out.reshape(T, -1))
            box.bell[doorbell.OUT] = box.seen  # after the output: the executor may read it
            return payload
        return to_wire(out)

    def free(self, bid):
        for path in [p for p in self.maps if Path(p).name.startswith(f"act_b{bid}_")]:
            self.maps.pop(path).close()
