"""What the GPU side keeps per batch between target passes: the draft model's state and the
tokens the next target pass feeds. Shared by the in-process reference backend and the GPU
executor actor, so both speculate with exactly the same code.

Bookkeeping of one round with k proposals, per sequence:
  draft input   = pending tokens (1, or 2 after a fully accepted round), then d1..d_{k-1}
                  (and d_k too where the draft feeds its last proposal: then pending is
                  always 1 token, so a round's first step is a graphed one-token step)
  target input  = [last, d1..dk]   (k+1 tokens; k = 0 is plain decoding)
  accepted a    -> target KV keeps last, d1..da; draft KV keeps what it saw of those;
                   the emitted tokens are d1..da plus one token t from the target,
                   which becomes `last` (and the draft's pending input).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from ..models.attention import KVCache
from ..models.host_io import host_tensor, packed, to_device, to_host
from ..models.resident import ResidentModel
from ..models.ring_cache import prime
from ..placement.draft_kv import DraftKV
from .draft_graph import GraphedDraftStep, graphable
from .logits_process import LogitsState, neutral_settings
from .sampler import SamplingTensors, probs_from_logits, sample
from .verify import verify_greedy, verify_sampled


@dataclass
class BatchState:
    last: torch.Tensor  # [B] the token the next target pass starts with
    samp: SamplingTensors
    draft_cache: KVCache | None = None
    pending: list = field(default_factory=list)  # per sequence: tokens the draft has not seen
    history: list | None = None  # per sequence: every token so far (draft KV recomputed per round)
    proposals: torch.Tensor | None = None  # [B, k]
    q: torch.Tensor | None = None  # [B, k, V] draft probabilities (sampled rows only)
    # While finished sequences' rows stay in the draft cache (SpecRunner.keep): the cache row
    # of each live sequence, on the host and on the device. None: row i is sequence i.
    rows: np.ndarray | None = None
    rows_t: torch.Tensor | None = None
    proc: LogitsState | None = None  # penalties / min_tokens / logprobs, when a sequence asks for them
    seen: int = 0  # this round's proposals the draft has fed itself (k - 1, or k: SpecRunner.feed_last)
    priming: object = None  # the draft still reading joining rows' prompts beside the pass (SpecRunner.prime_beside)


class SpecRunner:
    """Draft proposals and verification for many batches on one device."""

    def __init__(self, draft: ResidentModel | None, device, kv: DraftKV | None = None, *,
                 prefill_chunk: int = 64, max_new: int = 18, graphs: bool = True, lazy_rows: bool | None = None,
                 window: int | None = None, fp8: bool = False, sinks: int = 0, draft_kv: str = "gpu",
                 feed_last: bool | None = None, prime_beside: bool = False):
        """kv: where the draft's KV lives and what it sees (placement/draft_kv.py); `window`,
        `fp8`, `sinks` and `draft_kv` say the same field by field, when kv is None. A host-kept
        or recomputed draft KV visits the device `prefill_chunk` sequences at a time (pinned
        host memory for "host"). prefill_chunk: sequences per draft prefill step; graphs:
        replay the draft's one-token steps as CUDA graphs where that is safe (draft_graph.py).
        lazy_rows: finished sequences' rows stay in a device-kept draft cache, computed and
        ignored, until half of its rows are finished, so the batch's captured draft step keeps
        serving instead of being captured again every round of the batch's tail (each capture
        also empties the allocator cache and runs one step eagerly); None: when steps are graphed.
        feed_last: the draft also feeds itself its last proposal d_k (one more one-token step,
        whose logits nobody reads), so that every sequence starts the next round with one
        pending token: a round's first step then replays the captured graph, where a fully
        accepted row (pending [d_k, t]) otherwise makes it an eager two-token step, which at
        k >= 4 is nearly every round of a large batch. None: where the steps are graphed.
        prime_beside: rows that will join a running batch have the draft read their prompts on
        a thread of their own (on CUDA, a stream of their own), so that the batch's next draft
        round and target pass, which the start of a join used to hold up (~50 ms on the GPU
        machine, session 37's trace), go on meanwhile; whatever uses the new rows' draft state
        first waits for it (`_settle`)."""
        self.draft, self.device = draft, torch.device(device)
        self.prefill_chunk, self.max_new = prefill_chunk, max_new
        self.configure(kv or DraftKV(draft_kv, window, sinks, fp8))
        self.batches: dict[int, BatchState] = {}
        self.graphs_enabled = graphs
        self.lazy_rows = lazy_rows
        self.feed_last = feed_last
        self._graphs: dict[int, GraphedDraftStep] = {}  # per batch: its captured draft step
        self.graph_steps = 0  # draft steps that ran through a graph (captures included)
        self._oom_warned = False
        self.prime_beside = prime_beside
        self._primer = None  # the one thread priming runs on (made at the first join)

    def configure(self, kv: DraftKV):
        """Where the draft's KV lives and what it sees, for batches started from now on."""
        self.kv = kv

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, bid: int, samp: SamplingTensors, prompts: list[list[int]] | None, capacity: int,
              joins: int | None = None):
        """joins: the running batch these sequences will join (`merge`): an fp8 draft ring
        then takes that batch's scales, so that the joined rows share one."""
        st = BatchState(last=torch.zeros(len(samp.temperature), dtype=torch.long, device=self.device),
                        samp=samp)
        if samp.extra is not None:
            st.proc = LogitsState(samp.extra, self.device)
        if self.draft is not None and prompts is not None:
            if self.kv.rebuilt:
                st.history = [list(p) for p in prompts]
            else:
                like = self.batches[joins].draft_cache if joins is not None else None
                if self.prime_beside and joins is not None and self.kv.on_gpu:
                    st.draft_cache = self._new_cache(prompts, capacity, like)
                    st.priming = self._prime_beside(st.draft_cache, prompts)
                else:
                    st.draft_cache = self._draft_prefill(prompts, capacity, like)
        self.batches[bid] = st

    def _prime_beside(self, cache, prompts):
        """Prime `cache` (made on this thread, so its memory belongs to the current stream) on
        the primer thread; on CUDA on a stream of its own, which first waits for everything
        queued on the current stream: the cache's memory may be a block that work queued there
        still uses. Returns the future of the event that marks the priming done."""
        from concurrent.futures import ThreadPoolExecutor

        self._quiesce()  # one priming at a time
        if self._primer is None:
            self._primer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="draft-priming")
        side = None
        if self.device.type == "cuda":
            from ..models.cuda_streams import DRAFT_PRIMING, side_stream

            side = side_stream(DRAFT_PRIMING, self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))

        def run():
            if side is None:
                self._prime(cache, prompts)
                return None
            with torch.cuda.device(self.device), torch.cuda.stream(side):
                self._prime(cache, prompts)
                done = torch.cuda.Event()
                done.record(side)
            return done

        return self._primer.submit(run)

    def _settle(self, st: BatchState):
        """A batch's draft state from here on: wait for its priming (raising what it raised)
        and, on CUDA, have the current stream wait for its kernels."""
        if st.priming is None:
            return
        done = st.priming.result()  # a failed priming raises again at every later use of the batch
        st.priming = None
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)

    def _quiesce(self):
        """Wait until the primer thread has nothing left to launch; a priming that failed raises
        at its own batch's next use, not here."""
        from concurrent.futures import wait

        pending = [st.priming for st in self.batches.values() if st.priming is not None]
        if pending:
            wait(pending)

    def merge(self, bid: int, new: int):
        """Batch `new` (started with joins=bid, its first tokens out) takes the rows after
        batch bid's live ones, in order: waiting requests refilling a running batch in place."""
        st, nw = self.batches[bid], self.batches[new]
        self._settle(nw)
        if st.proposals is not None or nw.proposals is not None:
            raise RuntimeError("rows join a batch between its verification and its next proposals")
        # The draft cache first: it is the part that may allocate (a gather's copy, or taller
        # storage for a batch that started smaller than it now is), so that running out of
        # memory there leaves the rest of the batch's state as it was (GPUExecutor.merge then
        # fails the batch with one line).
        free = self._free_rows(st, nw)
        if free is not None:
            # Into the rows of finished sequences that the draft still computes (lazy rows): the
            # cache keeps its storage and height, so its captured step keeps serving. Appending
            # instead meant a recapture (and an eager step) in the round after every join: the
            # draft's round after a join took 72 ms against 30 (session 37's w1-long trace).
            with torch.inference_mode():  # the cache's tensors are inference tensors, written in place
                st.draft_cache.put_rows(free, nw.draft_cache)
            st.rows = np.concatenate([st.rows, free])
            st.rows_t = to_device(st.rows, self.device, torch.long)
        elif st.draft_cache is not None:
            self._stale(bid)  # the captured step serves a batch of the old height
            if st.rows is not None:  # finished rows still in the cache leave it first
                st.draft_cache.select(host_tensor(st.rows))
                st.rows = st.rows_t = None
            st.draft_cache.append(nw.draft_cache)
        del self.batches[new]
        self._graphs.pop(new, None)
        n, m = st.last.shape[0], nw.last.shape[0]
        st.last = torch.cat([st.last, nw.last])
        st.samp = st.samp.concat(nw.samp)
        if st.proc is not None or nw.proc is not None:
            mine = st.proc or LogitsState(neutral_settings(n), self.device)
            st.proc = mine.concat(nw.proc, m)
        st.pending = list(st.pending) + list(nw.pending)
        if st.history is not None:
            st.history = st.history + nw.history

    def _free_rows(self, st: BatchState, nw: BatchState) -> np.ndarray | None:
        """Rows of st's draft cache that finished sequences left and enough for nw's, or None."""
        if st.draft_cache is None or st.rows is None or nw.draft_cache is None:
            return None
        free = np.setdiff1d(np.arange(st.draft_cache.batch), st.rows)
        m = nw.draft_cache.batch
        return free[:m] if len(free) >= m else None

    def _draft_prefill(self, prompts, capacity, like=None):
        """The draft sees each prompt (when windowed: its first `sinks` and last `window`
        tokens, at their true positions), a chunk of sequences at a time to bound activation
        memory. like: a cache these rows will join, whose fp8 scales they take."""
        cache = self._new_cache(prompts, capacity, like)
        host = self.kv.in_host_memory and self.device.type != "cpu"
        if not self.kv.in_host_memory:
            self._prime(cache, prompts)
            return cache
        if host:
            cache.pin()
        for lo, hi, dev in self._visits(cache):
            prime(self.draft, dev, prompts[lo:hi], self.kv.window, self.kv.sinks, which=None)
        return cache

    def _prime(self, cache, prompts):
        """The draft reads `prompts` into `cache`, a chunk of sequences at a time."""
        prime(self.draft, cache, prompts, self.kv.window, self.kv.sinks, chunk=self.prefill_chunk, which=None)

    def _new_cache(self, prompts, capacity, like=None):
        # The ring holds W + the most tokens one decode pass adds; a W-token prefill fits too.
        host = self.kv.in_host_memory and self.device.type != "cpu"
        cache = self.draft.new_cache(len(prompts), capacity, window=self.kv.window, fp8=self.kv.fp8,
                                     max_new=self.max_new, sinks=self.kv.sinks, device="cpu" if host else None)
        if like is not None and getattr(like, "fp8", False):
            cache.k_scale, cache.v_scale = list(like.k_scale), list(like.v_scale)
        return cache

    def _visits(self, cache):
        """(lo, hi, device copy of those rows) per chunk of a host-kept draft cache; each
        copy's contents go back to host memory when the loop moves on."""
        for lo in range(0, cache.batch, self.prefill_chunk):
            hi = min(cache.batch, lo + self.prefill_chunk)
            part = cache.part(lo, hi)
            dev = part.to(self.device)
            yield lo, hi, dev
            part.load(dev)
            cache.merge(lo, part)

    def _lazy(self, st: BatchState) -> bool:
        if not self.kv.on_gpu:
            return False
        if self.lazy_rows is not None:
            return self.lazy_rows
        return self._graphed(st)

    def _feeds_last(self, st: BatchState) -> bool:
        return self._graphed(st) if self.feed_last is None else self.feed_last

    def _graphed(self, st: BatchState) -> bool:
        """Whether the batch's one-token draft steps replay a captured graph."""
        return self.graphs_enabled and graphable(self.draft, st.draft_cache)

    def keep(self, bid: int, idx: np.ndarray):
        st = self.batches[bid]
        self._settle(st)
        t = to_device(idx, self.device, torch.long)
        st.last, st.samp = st.last[t], st.samp.select(idx)
        if st.proc is not None:
            st.proc.select(idx)
        st.pending = [st.pending[i] for i in idx] if st.pending else []
        if st.history is not None:
            st.history = [st.history[i] for i in idx]
        if st.proposals is not None:
            st.proposals = st.proposals[t]
        if st.q is not None:
            st.q = st.q[t]
        if st.draft_cache is not None:
            rows = np.asarray(idx) if st.rows is None else st.rows[idx]
            if self._lazy(st) and 2 * len(rows) > st.draft_cache.batch:
                st.rows, st.rows_t = rows, to_device(rows, self.device, torch.long)
            else:
                self._stale(bid)
                st.draft_cache.select(host_tensor(rows))
                st.rows = st.rows_t = None

    def _stale(self, bid: int):
        """The batch's draft cache is about to get new storage: its graph must not replay, but
        is kept until the next capture takes over its memory pool."""
        if bid in self._graphs:
            self._graphs[bid].stale = True

    def free(self, bid: int):
        st = self.batches.pop(bid, None)
        if st is not None and st.priming is not None:  # its memory must not be reused under it
            try:
                self._settle(st)
            except Exception:  # noqa: BLE001 - the batch is going; what failed it reports elsewhere
                pass
        self._graphs.pop(bid, None)

    def _step(self, bid: int, st: BatchState, toks, q_lens, n_q):
        """One draft forward pass: through the batch's captured graph when every sequence has
        one new token and the cache allows it, else eagerly."""
        if n_q == 1 and self._graphed(st):
            g = old = self._graphs.get(bid)
            fresh = g is None or not g.serves(st.draft_cache)
            if fresh:
                self._quiesce()  # no other thread launching work while this one captures
                # A recapture reuses the memory pool of the capture it replaces, which stays
                # alive (`old`) until then: a pool is freed with its last graph.
                pool = old.graph.pool() if old is not None and old.graph is not None else None
                g = self._graphs[bid] = GraphedDraftStep(self.draft, st.draft_cache, pool)
            out = g.step(toks)
            del old
            if g.graph is not None:
                self.graph_steps += 1
            elif fresh:
                if isinstance(g.error, torch.OutOfMemoryError):
                    # Memory may be there at the next capture (rows leave, batches end):
                    # only this cache state steps eagerly.
                    if not self._oom_warned:
                        warnings.warn(f"a draft step ran out of memory in CUDA graph capture; until the batch's "
                                      f"rows change its steps run eagerly ({g.error})", stacklevel=2)
                        self._oom_warned = True
                else:
                    warnings.warn(f"draft steps run eagerly: CUDA graph capture failed ({g.error})", stacklevel=2)
                    self.graphs_enabled = False
                    self._graphs.pop(bid, None)
            return out
        return self.draft.forward(st.draft_cache, toks, q_lens, n_q=n_q)

    # -- one round -------------------------------------------------------------------------
    def propose(self, bid: int, k: int, u_draft: np.ndarray):
        """Draft k tokens per sequence (u_draft [B, k] uniforms for sampled rows)."""
        for _ in self.propose_steps(bid, k, u_draft):
            pass

    def propose_steps(self, bid: int, k: int, u_draft: np.ndarray):
        """The same as `propose`, one draft step per iteration, so a caller can run the steps
        in the gaps of other work (dual-batch interleaving)."""
        st = self.batches[bid]
        self._settle(st)
        B = st.last.shape[0]
        st.proposals, st.q = None, None
        u = None if st.samp.all_greedy else to_device(u_draft, self.device, torch.float32)
        if self.kv.on_gpu:
            pending = st.pending
            if st.rows is not None:  # finished sequences' rows still in the cache get a dummy token
                pending = [[0]] * st.draft_cache.batch
                for i, r in enumerate(st.rows.tolist()):
                    pending[r] = st.pending[i]
            p, q = yield from self._draft_block(bid, st, st.draft_cache, *self._inputs(pending), k, slice(0, B), u,
                                                st.rows_t)
        else:  # one chunk of sequences on the device at a time
            props, qs = [], []
            for rows, cache, first in self._chunks(st, k):
                yield -1
                p, q = yield from self._draft_block(None, st, cache, *first, k, rows, u)
                props.append(p)
                qs.append(q)
            p = torch.cat(props) if props else torch.zeros(0, k, dtype=torch.long, device=self.device)
            q = torch.cat(qs) if qs and qs[0] is not None else None
        st.proposals, st.q = p, q
        yield k

    def _inputs(self, pending: list) -> tuple:
        """A draft step's packed input tokens, per-sequence counts and most tokens of any
        sequence, built on the host (pending tokens are host lists): no device reads."""
        return (*packed(pending, self.device), max((len(p) for p in pending), default=1))

    def _chunks(self, st: BatchState, k: int):
        """(rows, device draft cache of those rows, first step's input) per chunk of a batch
        whose draft KV is not kept on the device: brought from host memory (and written back
        when the loop moves on), or rebuilt from each sequence's tokens (the first step's
        logits come out of that re-prefill)."""
        if self.kv.in_host_memory:
            for lo, hi, dev in self._visits(st.draft_cache):
                yield slice(lo, hi), dev, self._inputs(st.pending[lo:hi])
            return
        B = st.last.shape[0]
        for lo in range(0, B, self.prefill_chunk):
            hi = min(B, lo + self.prefill_chunk)
            hist = st.history[lo:hi]
            cache = self.draft.new_cache(hi - lo, max(map(len, hist)) + k + 1, window=self.kv.window,
                                         fp8=self.kv.fp8, max_new=self.max_new, sinks=self.kv.sinks)
            yield slice(lo, hi), cache, (prime(self.draft, cache, hist, self.kv.window, self.kv.sinks), None, None)

    def _draft_block(self, bid, st: BatchState, cache, first, q_lens, n_q, k: int, rows: slice, u, live=None):
        """k draft tokens for the sequences `rows` of a batch, whose draft state is `cache`.
        `first`: the first step's logits (a re-prefill just made them), or its packed input
        tokens; `live`: the cache row of each sequence when the cache also holds finished
        ones (their logits are dropped). Yields after each step but the last; returns
        (proposals [n, k], probs or None)."""
        greedy = st.samp.all_greedy
        if not greedy:
            temp, top_k, top_p = (t[rows] for t in st.samp.to(self.device))
        n = len(range(*rows.indices(st.last.shape[0])))
        m = n if live is None else cache.batch  # rows the draft computes
        props, qs = [], []
        toks = first
        for i in range(k):
            with torch.inference_mode():
                if q_lens is None and i == 0:
                    logits = first
                elif bid is None:  # a cache rebuilt this round: not worth capturing
                    logits = self.draft.forward(cache, toks, q_lens, n_q=n_q)
                else:
                    logits = self._step(bid, st, toks, q_lens, n_q)  # [m, V]
                if live is not None:
                    logits = logits[live]
                if st.proc is not None and st.proc.s.penalized:
                    # The draft's history: the output so far plus its own proposals of this block.
                    hist = torch.stack(props, 1) if props else torch.zeros(n, 0, dtype=torch.long, device=self.device)
                    logits = st.proc.process(logits[:, None], hist, rows)[:, 0]
                if greedy:
                    d = logits.argmax(-1)
                else:
                    q = probs_from_logits(logits[:, None], temp, top_k, top_p)[:, 0]
                    d = sample(q, u[rows, i])
                    qs.append(q)
            props.append(d)
            toks = d if live is None else torch.zeros(m, dtype=torch.long, device=self.device).index_copy_(0, live, d)
            q_lens, n_q = torch.ones(m, dtype=torch.long, device=self.device), 1
            if i < k - 1:
                yield i
        st.seen = max(k - 1, 0)
        if k and bid is not None and self._feeds_last(st):
            with torch.inference_mode():
                self._step(bid, st, toks, q_lens, n_q)  # d_k into the cache; its logits are not needed
            st.seen = k
        p = torch.stack(props, 1) if k else torch.zeros(n, 0, dtype=torch.long, device=self.device)
        return p, (torch.stack(qs, 1) if qs else None)

    def target_inputs(self, bid: int, k: int):
        """Packed tokens and per-sequence counts for the target pass of this round."""
        st = self.batches[bid]
        B = st.last.shape[0]
        props = st.proposals if k else torch.zeros(B, 0, dtype=torch.long, device=self.device)
        assert props.shape[1] == k, "propose() must run before a k > 0 target pass"
        toks = torch.cat([st.last[:, None], props], 1).reshape(-1)
        return toks, torch.full((B,), k + 1, dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def finish(self, bid: int, logits: torch.Tensor, k: int, u_accept: np.ndarray, u_sample: np.ndarray,
               first: bool = False):
        """Verify the target's logits [B, k+1, V]; returns (tokens [B, k+1], counts [B]) as numpy.

        `first`: the logits come from the prefill (k = 0), the draft has seen the prompt.
        """
        st = self.batches[bid]
        self._settle(st)
        props = st.proposals if k else torch.zeros(logits.shape[0], 0, dtype=torch.long, device=self.device)
        raw = logits
        if st.proc is not None and st.proc.s.penalized:  # position j sees the output plus d1..dj
            logits = st.proc.process(logits, props)
        if st.samp.all_greedy:
            tokens, counts = verify_greedy(logits, props)
        else:
            temp, top_k, top_p = st.samp.to(self.device)
            p = probs_from_logits(logits, temp, top_k, top_p)
            us = to_device(u_sample, self.device, torch.float32)
            ua = to_device(u_accept, self.device, torch.float32)[:, :k] if k else None
            tokens, counts = verify_sampled(p, props, st.q if k else None, ua, us)
        rows = torch.arange(tokens.shape[0], device=self.device)
        st.last = tokens[rows, counts - 1]
        tokens_h, counts_h = (t.numpy() for t in to_host(tokens, counts))  # one wait per round
        if st.draft_cache is not None:
            self._roll_draft(st, k, counts, tokens_h, counts_h, first)
        if st.history is not None:
            for h, t, c in zip(st.history, tokens_h, counts_h):
                h.extend(t[:c].tolist())
        st.proposals, st.q = None, None
        if st.proc is not None:
            lp = st.proc.logprobs(raw, tokens) if st.proc.s.wants_logprobs else None
            st.proc.update(tokens, counts)
            if lp is not None:  # the target's log-probabilities at every emitted position
                return tokens_h, counts_h, lp
        return tokens_h, counts_h

    def _roll_draft(self, st: BatchState, k: int, counts: torch.Tensor, tokens_h: np.ndarray,
                    counts_h: np.ndarray, first: bool):
        last = tokens_h[np.arange(len(counts_h)), counts_h - 1].tolist()
        if first or k == 0:
            if not first:  # a plain decoding round the draft sat out: it must see `last` too
                st.pending = [p + [t] for p, t in zip(st.pending, last)]
            else:
                st.pending = [[t] for t in last]
            return
        a = (counts_h - 1).tolist()
        # The draft saw pending + d1..d_s (s = st.seen: k - 1, or k); keep pending + d1..d_min(a, s).
        if st.draft_cache.lens.device != counts.device:  # kept in host memory: use the host copy
            counts = torch.from_numpy(counts_h)
        lens, s = st.draft_cache.lens, st.seen
        if st.rows is None:
            keep = lens - s + (counts - 1).clamp(max=s)
        else:  # finished rows go back to where the round found them (a dummy token, then s steps)
            keep = lens - (s + 1)
            keep[st.rows_t] = lens[st.rows_t] - s + (counts - 1).clamp(max=s)
        st.draft_cache.truncate(keep)
        if s == k:  # the draft has seen every accepted proposal: only the target's token is new
            st.pending = [[t] for t in last]
            return
        # Emitted tokens start with the accepted proposals, so d_k is tokens[b, k-1] when a = k.
        st.pending = [([int(tokens_h[b, k - 1])] if a[b] == k else []) + [last[b]] for b in range(len(last))]
