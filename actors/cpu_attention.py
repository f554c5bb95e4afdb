"""The CPU attention worker actor: the target's KV cache in host memory, and attention.

Per batch it holds one KVCache (per layer [B, Hkv, capacity, d], ragged lengths). It
stores prefill K/V, appends and attends for decode (1 query per sequence) and verification
blocks (k+1 queries, causal inside the block), and rolls back rejected tokens by moving
lengths (no copying). Torch threads are set to the cores Ray gives it.

A batch whose first g rows attend on the GPU (plan.gpu_kv_rows, placement/gpu_kv_rows.py) is
held from row g on: this worker's row i is the batch's row g + i, and the executor sends it
q/k/v and row ranges in those coordinates.
"""

from __future__ import annotations

import time

import torch

from ..errors import CapacityError, SpecOffloadError
from .. import host_malloc
from ..memory_facts import anon_huge_bytes, minor_faults
from ..models import attention
from ..models.attention import KVCache, fits_storage
from ..models.host_io import host_tensor
from ..placement.gpu_kv_rows import split_keep
from . import doorbell
from .kv_ring import RingReader, is_handle
from .mailbox import WorkerMailboxes
from .stage_timer import StageTimer
from .wire import from_wire


# Freed batches' K/V storage kept for later batches (`CPUAttention._keep_spare`): two, as a
# joining batch starts before the one before it merges, and at most SPARE_BYTES of host memory
# in all (joining batches' are kept, a full batch's, 16 GB at W1-long's 192 rows, is let go).
SPARE_KEPT = 2
SPARE_BYTES = 4 << 30


def _nbytes(storage: tuple[list, list]) -> int:
    return sum(t.numel() * t.element_size() for t in storage[0] + storage[1])


class CPUAttention:
    def __init__(self, spec, threads: int | None = None, kv_dtype: str | None = None, trace: bool = False,
                 ragged_keys: int | None = None, query_rows: int | None = None, huge_pages: bool = False,
                 keep_freed_memory: bool = False):
        self.spec = spec
        # plan.keep_freed_memory: before the first cache or temporary, for the process's life
        self.keeps_freed_memory = host_malloc.keep_freed_memory() if keep_freed_memory else False
        self.timer = StageTimer("cpu", role="cpu_attention", trace=trace)
        if threads:
            torch.set_num_threads(threads)
        self.kv_dtype = getattr(torch, kv_dtype) if kv_dtype else spec.torch_dtype
        self.ragged_keys = ragged_keys  # plan.ragged_attention: rows attend in ranges of similar lengths
        self.query_rows = query_rows  # plan.cpu_query_rows, handed to each batch's cache
        self.huge_pages = huge_pages  # plan.kv_huge_pages: new caches' storage asked for in 2 MiB pages
        self.caches: dict[int, KVCache] = {}
        self._failed: dict[int, Exception] = {}  # batch -> why its start failed (its calls raise it)
        self.prompt_lens: dict[int, torch.Tensor] = {}
        self.gpu_rows: dict[int, int] = {}  # batch -> its rows [0, g) held on the GPU instead
        self.parts: dict[tuple, KVCache] = {}  # (batch, first sequence) -> micro-batch view
        self.bell_parts: dict[tuple, tuple] = {}  # (batch, micro-batch) -> its layer-0 q/k/v message
        self.mail = WorkerMailboxes(spec)
        self.ring = RingReader(spec)
        self.seconds = 0.0
        self.kv_bytes_read = 0
        self.ring_stores = 0  # prefill K/V that came through a shared-memory ring
        self.layer_calls = self.sdpa_calls = 0  # attend() calls, and the SDPA calls they made
        self.layer_runs = 0  # attend_layers() calls: a pass's middle layers in one Ray call
        self.row_tokens = 0  # (token, layer) pairs of verification passes attended here
        # Freed batches' host K/V storage, kept for later batches (rows joining a running
        # batch come up to 16 at a time, each a batch of its own until `merge`): 16 rows x
        # 1,290 positions x 8 layers of w1-long is 676 MB, whose zeroing and first-touch page
        # faults took 260-460 ms on the development machine's 2 cores, on this worker's clock,
        # which the layer chain waits for; w1-long joins ~30 times.
        self._spare: list[tuple] = []
        self.start_s = self.merge_s = 0.0  # time in `start` (the cache) and `merge` (rows joining)
        self.spare_reused = 0
        self.anon_huge_at_start = None  # bytes in huge pages after the last large cache was made

    def ready(self) -> int:
        return torch.get_num_threads()

    def set_huge_pages(self, on: bool) -> bool:
        """plan.kv_huge_pages for the caches made from now on (benchmarks compare both ways)."""
        self.huge_pages = bool(on)
        return self.huge_pages

    def start(self, bid, prompt_lens, capacity: int, prefill_batch: int, gpu_rows: int = 0):
        # "rows" spans (start, keep, merge): in a trace, whether a join's row work on this
        # worker delays the next pass's attention (scripts/trace_join_passes.py)
        with self.timer.span("rows", f"b{bid} start {len(prompt_lens) - gpu_rows}"):
            self._start(bid, prompt_lens, capacity, prefill_batch, gpu_rows)

    def _start(self, bid, prompt_lens, capacity: int, prefill_batch: int, gpu_rows: int):
        t0 = time.perf_counter()
        s, rows = self.spec, len(prompt_lens) - gpu_rows
        self.free(bid)  # whatever an earlier run left under this id
        spare = self._take_spare(rows, capacity)
        try:
            self.caches[bid] = KVCache(s.num_layers, rows, s.num_kv_heads, s.head_dim, capacity,
                                       self.kv_dtype, "cpu", s.sliding_windows, ragged=self.ragged_keys is not None,
                                       call_keys=self.ragged_keys, max_rows=self.query_rows, storage=spare,
                                       huge_pages=self.huge_pages)
            self.spare_reused += spare is not None
            if spare is None and rows * capacity * s.kv_bytes_per_token >= 1 << 30:
                # A large new cache: how much of the process's anonymous memory now sits in
                # huge pages (memory_facts: what may tell a first run from a later one)
                self.anon_huge_at_start = anon_huge_bytes()
        except (RuntimeError, MemoryError) as e:
            # The backend queues this batch's stores and attention without waiting for start:
            # each of them raises this cause, not a missing batch (`_cache`).
            gib = rows * capacity * s.kv_bytes_per_token // s.torch_dtype.itemsize * self.kv_dtype.itemsize / 2**30
            self._failed[bid] = CapacityError(
                f"the host KV cache of {rows} sequences x {capacity} tokens ({gib:.1f} GiB) could not be allocated: "
                f"lower batch_size or max_tokens, or free host memory ({str(e).splitlines()[0][:100]})")
            raise self._failed[bid] from None
        self.prompt_lens[bid] = host_tensor(prompt_lens[gpu_rows:], torch.long)
        self.gpu_rows[bid] = gpu_rows
        self.prefill_batch = prefill_batch
        self.start_s += time.perf_counter() - t0

    def store_prefill(self, bid, s: int, j: int, kv, after=None):
        """K/V of layer j for prefill sub-batch s, computed on the executor, arriving padded
        as [P, Hkv, longest prompt, d] so storing them is one strided copy, not a scatter;
        in a slot of the batch's shared-memory ring (actors/kv_ring.py) or as wire arrays.
        None: the batch's prefill failed on the executor (its head raises why). after: unused,
        an executor call that returns once these K/V are in the ring (rows joining a pass,
        whose prefill call returns before its copy ends; ActorBackend._overlaps)."""
        if kv is None:
            return
        cache = self._cache(bid)
        P, g = self.prefill_batch, self.gpu_rows[bid]
        if is_handle(kv):
            k, v = self.ring.recv(kv)
            self.ring_stores += 1
        else:
            k, v = from_wire(kv[0]), from_wire(kv[1])
        # The executor sends only the sub-batch's rows past the GPU's g; lo: the first of them here.
        lo = max(0, s * P - g)
        n, L = k.shape[0], k.shape[2]
        with self.timer.span("store_prefill", f"b{bid} L{j} s{s}"):
            cache.k[j][lo: lo + n, :, :L].copy_(k)
            cache.v[j][lo: lo + n, :, :L].copy_(v)
        if j == self.spec.num_layers - 1:
            cache.lens[lo: lo + n] = self.prompt_lens[bid][lo: lo + n]
            if lo + n >= cache.batch:  # the batch's last K/V: its ring is done with
                self.ring.free(bid)

    def attend(self, bid, j: int, qkv, p: int = 0):
        """Layer j for micro-batch p, sequences [lo, hi) of the batch: append its new K/V,
        attend causally over the cache; the micro-batch is a view of the batch's cache.
        qkv BELL (j > 0, plan.layer_doorbell): the q/k/v come through the mailbox layer 0's
        payload named, once its doorbell rings (actors/doorbell.py)."""
        bell = qkv == doorbell.BELL
        if bell:
            qkv = self.bell_parts.get((bid, p))
            if qkv is None:  # Ray never ran layer 0's call: the executor's side failed first
                raise doorbell.PeerFailed(f"batch {bid}: this pass's first layer never reached the CPU worker")
        elif j == 0:
            self.bell_parts[(bid, p)] = qkv
        payload = qkv[0]
        try:
            return self._attend(bid, j, qkv, bell)
        except BaseException:
            self.mail.fail(payload)
            raise
        finally:
            if j == self.spec.num_layers - 1:  # the next pass's layers wait for its own layer 0
                self.bell_parts.pop((bid, p), None)

    def attend_layers(self, parts: list, j0: int, j1: int) -> int:
        """Layers j0..j1-1 of a doorbell pass (j0 > 0), each layer for every part in order, in
        one call: what a run of `attend(bid, j, BELL, p)` calls does, without Ray's ~1 ms
        between calls (docs/benchmarks.md, session 32: W4's worker waited that long between
        its 160 calls a pass while it bounded the layer chain). Returns the layers attended."""
        if j0 < 1:
            raise ValueError("layer 0's q/k/v come with Ray's hand-off: attend it on its own")
        self.layer_runs += 1
        for j in range(j0, j1):
            for bid, p in parts:
                self.attend(bid, j, doorbell.BELL, p)
        return j1 - j0

    def _attend(self, bid, j: int, qkv, bell: bool):
        payload, q_lens, lo, hi = qkv
        q, k, v = self.mail.recv_qkv(payload, bell)
        t = time.perf_counter()  # the doorbell's wait is not attention (stats: bell_wait_s)
        if hi == lo:  # every row of the batch attends on the GPU now: nothing to do here
            return self.mail.send_out(payload, q.new_empty(0, q.shape[1] * q.shape[2]))
        if j == 0:
            part = self.parts[(bid, lo)] = self._cache(bid).part(lo, hi)
            part.begin_pass(host_tensor(q_lens))
        part = self.parts[(bid, lo)]
        with self.timer.span("cpu_attention", f"b{bid} L{j} [{lo}:{hi})"):
            out = part.attend_layer(j, q, k, v, out=self.mail.out_buffer(payload))
        self.layer_calls += 1
        self.row_tokens += q.shape[0]
        self.sdpa_calls += part.calls
        self.kv_bytes_read += int(part.lens.sum() + q.shape[0]) * 2 * k.shape[1] * k.shape[2] * part.k[j].element_size()
        if j == self.spec.num_layers - 1:
            part.advance()
            self.caches[bid].merge(lo, self.parts.pop((bid, lo)))
        out = self.mail.send_out(payload, out)
        self.seconds += time.perf_counter() - t
        return out

    def rollback(self, bid, k: int, result):
        """After a pass over k+1 new tokens, keep only the `counts` the target accepted."""
        counts = result[1][self.gpu_rows[bid]:]  # (tokens, counts[, logprobs]); this worker's rows
        cache = self._cache(bid)
        cache.truncate(cache.lens - (k + 1) + host_tensor(counts))

    def keep(self, bid, idx):
        _, rows, self.gpu_rows[bid] = split_keep(idx, self.gpu_rows[bid])
        with self.timer.span("rows", f"b{bid} keep {len(rows)}"):
            self._cache(bid).select(host_tensor(rows, torch.long))

    def merge(self, bid, new):
        """Batch `new`'s sequences (their prefill stored) take the rows after bid's live ones;
        its GPU rows, if any, join bid's on the executor (placement/gpu_kv_rows.merge_order)."""
        t0 = time.perf_counter()
        with self.timer.span("rows", f"b{bid} merge b{new}"):
            self._cache(bid).append(self._cache(new))
        self.gpu_rows[bid] += self.gpu_rows.get(new, 0)
        self.free(new)
        self.merge_s += time.perf_counter() - t0

    def _cache(self, bid) -> KVCache:
        if bid in self.caches:
            return self.caches[bid]
        err = self._failed.get(bid)
        if isinstance(err, SpecOffloadError):  # the user's problem: the same one line each time
            raise err.with_traceback(None)
        raise RuntimeError(f"no batch {bid} on the CPU worker")

    def free(self, bid):
        self._keep_spare(self.caches.pop(bid, None))
        self._failed.pop(bid, None)
        self.parts = {key: p for key, p in self.parts.items() if key[0] != bid}
        self.bell_parts = {key: m for key, m in self.bell_parts.items() if key[0] != bid}
        self.prompt_lens.pop(bid, None)
        self.gpu_rows.pop(bid, None)
        self.mail.free(bid)
        self.ring.free(bid, idle=not self.caches)

    def _keep_spare(self, cache: KVCache | None):
        """Keep a freed cache's storage for a later batch: the SPARE_KEPT largest freed (a
        joining batch starts before the one before it merges, and a storage holds any batch of
        no more rows and positions), within SPARE_BYTES in all (a full batch's is let go)."""
        if cache is None or _nbytes(cache._base) > SPARE_BYTES:
            return
        self._spare = sorted(self._spare + [cache._base], key=_nbytes)[-SPARE_KEPT:]
        while sum(map(_nbytes, self._spare)) > SPARE_BYTES:
            self._spare.pop(0)

    def _take_spare(self, rows: int, capacity: int):
        """The smallest kept storage that holds `rows` rows at `capacity` in this worker's
        dtype (taken: it is kept no longer), else None."""
        s = self.spec
        shape = (rows, s.num_kv_heads, capacity, s.head_dim)
        fit = [i for i, x in enumerate(self._spare) if fits_storage(x, s.num_layers, shape, self.kv_dtype)]
        if not fit:
            return None
        return self._spare.pop(min(fit, key=lambda i: _nbytes(self._spare[i])))

    def stats(self) -> dict:
        return {"cpu_attention_s": self.seconds, "kv_bytes_read": self.kv_bytes_read,
                "prefill_ring_stores": self.ring_stores, "attention_layer_calls": self.layer_calls,
                "attention_sdpa_calls": self.sdpa_calls, "cpu_row_tokens": self.row_tokens,
                "worker_bell_wait_s": round(self.mail.bell_wait_s, 3), "worker_layer_runs": self.layer_runs,
                "cpu_query_rows": attention.query_row_limit(self.query_rows),  # as the caches apply it (None: none)
                "worker_start_s": round(self.start_s, 3), "worker_merge_s": round(self.merge_s, 3),
                "worker_spare_reused": self.spare_reused, "worker_minor_faults": minor_faults(),
                "worker_keeps_freed_memory": self.keeps_freed_memory,
                "worker_anon_huge_at_start": self.anon_huge_at_start}

    def trace_events(self) -> list[dict]:
        return self.timer.take_events()
