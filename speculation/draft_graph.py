"""The draft's one-token step replayed as a CUDA graph.

One draft step of a Mistral-7B-shaped draft for a whole batch is about 1,500 small kernels.
Launched one by one from Python they cost twice the GPU time they fill (profile_draft on the
H200: 26 ms per step at batch 192, 12 ms of it GPU time; 45 ms inside the busy executor),
and a round drafts k of them. A captured graph launches the whole step at once (measured in
one profile_draft run on the H200: 33.3 -> 23.0 ms per step at batch 192, window 128, fp8,
18.3 ms once the fp8 scales moved off the ring; 33.1 -> 12.0 ms at batch 32; docs/benchmarks.md).

A graph bakes in tensor addresses and shapes, so it is captured per cache state: the ring's
storage stays put across rounds (`truncate` writes lengths in place), so one capture serves
every round until the cache's rows change (`select` builds new tensors), after which the step
is captured again. Finished sequences' rows stay in the cache until half of its rows are
finished (SpecRunner's lazy rows), so a batch's tail recaptures a few times, not every
round. Only what is safe to capture is graphed: a windowed (ring) draft cache (a full cache
sizes its attention from a device read) and a dense draft (MoE routing reads expert counts
back to the host) without dynamic RoPE (it picks frequencies per length on the host).
"""

from __future__ import annotations

import torch

from ..models.attention import KVCache
from ..models.cuda_streams import GRAPH_CAPTURE, side_stream
from ..models.ring_cache import RingKVCache
from ..models.rope import needs_host_lengths


def graphable(model, cache: KVCache | None) -> bool:
    return (cache is not None and isinstance(cache, RingKVCache) and model.device.type == "cuda"
            and not model.spec.is_moe and not needs_host_lengths(model.spec.rope))


def _storage_key(cache: RingKVCache) -> tuple:
    return (cache.batch, cache.lens.data_ptr(), cache.pos.data_ptr(), cache.k[0].data_ptr(),
            cache.v[-1].data_ptr())


class GraphedDraftStep:
    """`step(tokens)`: the draft's logits [B, V] for one new token per sequence of `cache`,
    advancing the cache, exactly as `model.forward(cache, tokens, ones, n_q=1)` does. The
    returned tensor is overwritten by the next step: use it before then."""

    def __init__(self, model, cache: RingKVCache, pool=None):
        """pool: the memory pool of a capture this one replaces (`.pool()` of its graph, which
        must never replay again): the new capture reuses its memory."""
        self.model, self.cache, self.pool = model, cache, pool
        self.stale = False  # set when the cache's rows change: the graph must not replay
        self.key = _storage_key(cache)
        dev = model.device
        self.tokens = torch.zeros(cache.batch, dtype=torch.long, device=dev)
        self.q_lens = torch.ones(cache.batch, dtype=torch.long, device=dev)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.error: Exception | None = None  # why capture failed, if it did

    def serves(self, cache) -> bool:
        return not self.stale and cache is self.cache and _storage_key(cache) == self.key

    def _forward(self):
        return self.model.forward(self.cache, self.tokens, self.q_lens, n_q=1)

    def _capture(self) -> torch.cuda.CUDAGraph:
        """Record one step. Like `torch.cuda.graph(...)` minus its explicit device synchronize
        (which waits for the weight copies in flight, up to two 2.9 GB layers) and its flush of
        pinned host blocks. The allocator's cache is still emptied first (freeing blocks may
        itself wait for the device): a capture only allocates into its own pool, and under a GPU
        cap a recapture can otherwise run out of memory."""
        torch.cuda.empty_cache()
        g = torch.cuda.CUDAGraph()
        cur = torch.cuda.current_stream(self.model.device)
        side = side_stream(GRAPH_CAPTURE, self.model.device)  # not the default stream, nor a copier's
        side.wait_stream(cur)
        with torch.cuda.stream(side):
            # thread_local: the weight streamer's feeder thread keeps issuing copies meanwhile.
            g.capture_begin(*([self.pool] if self.pool is not None else []), capture_error_mode="thread_local")
            try:
                self.logits = self._forward()
            except BaseException:
                try:  # the capture is void; end it quietly so the forward's error (say OOM) is what surfaces
                    g.capture_end()
                except Exception:  # noqa: BLE001, S110
                    pass
                raise
            g.capture_end()
        cur.wait_stream(side)
        return g

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        # The first step runs eagerly (the warm-up capture needs: cuBLAS handles, the RoPE
        # table), then is recorded; recording runs nothing, so the cache advances once. After
        # a failed capture every step of this cache state runs eagerly.
        out = self._forward()
        if self.error is None:
            try:
                self.graph = self._capture()
            except Exception as e:  # noqa: BLE001 - any capture failure: the caller falls back to eager steps
                # (RuntimeError from CUDA; a build without CUDA raises AssertionError, a CPU model ValueError)
                self.error = e
        return out
