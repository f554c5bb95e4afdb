"""What the GPU side keeps per batch between target passes: the draft model's state and the
tokens the next target pass feeds. Shared by the in-process reference backend and the GPU
executor actor, so both speculate with exactly the same code.

Bookkeeping of one round with k proposals, per sequence:
  draft input   = pending tokens (1, or 2 after a fully accepted round), then d1..d_{k-1}
  target input  = [last, d1..dk]   (k+1 tokens; k = 0 is plain decoding)
  accepted a    -> target KV keeps last, d1..da; draft KV keeps what it saw of those;
                   the emitted tokens are d1..da plus one token t from the target,
                   which becomes `last` (and the draft's pending input).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..models.attention import KVCache
from ..models.host_io import to_device, to_host
from ..models.resident import ResidentModel
from ..models.ring_cache import prime
from .sampler import SamplingTensors, probs_from_logits, sample
from .verify import verify_greedy, verify_sampled


@dataclass
class BatchState:
    last: torch.Tensor  # [B] the token the next target pass starts with
    samp: SamplingTensors
    draft_cache: KVCache | None = None
    pending: list = field(default_factory=list)  # per sequence: tokens the draft has not seen
    proposals: torch.Tensor | None = None  # [B, k]
    q: torch.Tensor | None = None  # [B, k, V] draft probabilities (sampled rows only)


class SpecRunner:
    """Draft proposals and verification for many batches on one device."""

    def __init__(self, draft: ResidentModel | None, device, window: int | None = None, fp8: bool = False,
                 prefill_chunk: int = 64, max_new: int = 18, sinks: int = 0):
        """window: the draft attends over only the last `window` tokens (its KV a ring);
        fp8: store that ring in fp8; sinks: the first tokens of each sequence it also keeps;
        prefill_chunk: sequences per draft prefill step."""
        self.draft, self.device = draft, torch.device(device)
        self.sinks = sinks
        if sinks and window is None:
            raise ValueError("attention sinks need a draft window")
        self.window, self.fp8, self.prefill_chunk, self.max_new = window, fp8, prefill_chunk, max_new
        if fp8 and window is None:
            raise ValueError("an fp8 draft KV cache needs a draft window")
        self.batches: dict[int, BatchState] = {}

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, bid: int, samp: SamplingTensors, prompts: list[list[int]] | None, capacity: int):
        st = BatchState(last=torch.zeros(len(samp.temperature), dtype=torch.long, device=self.device),
                        samp=samp)
        if self.draft is not None and prompts is not None:
            st.draft_cache = self._draft_prefill(prompts, capacity)
        self.batches[bid] = st

    def _draft_prefill(self, prompts, capacity):
        """The draft sees each prompt (when windowed: its first `sinks` and last `window`
        tokens, at their true positions), a chunk of sequences at a time to bound activation
        memory."""
        # The ring holds W + the most tokens one decode pass adds; a W-token prefill fits too.
        cache = self.draft.new_cache(len(prompts), capacity, window=self.window, fp8=self.fp8,
                                     max_new=self.max_new, sinks=self.sinks)
        prime(self.draft, cache, prompts, self.window, self.sinks, chunk=self.prefill_chunk, which=None)
        return cache

    def keep(self, bid: int, idx: np.ndarray):
        st = self.batches[bid]
        t = to_device(idx, self.device, torch.long)
        st.last, st.samp = st.last[t], st.samp.select(idx)
        st.pending = [st.pending[i] for i in idx] if st.pending else []
        if st.proposals is not None:
            st.proposals = st.proposals[t]
        if st.q is not None:
            st.q = st.q[t]
        if st.draft_cache is not None:
            st.draft_cache.select(torch.as_tensor(idx))

    def free(self, bid: int):
        self.batches.pop(bid, None)

    # -- one round -------------------------------------------------------------------------
    def propose(self, bid: int, k: int, u_draft: np.ndarray):
        """Draft k tokens per sequence (u_draft [B, k] uniforms for sampled rows)."""
        for _ in self.propose_steps(bid, k, u_draft):
            pass

    def propose_steps(self, bid: int, k: int, u_draft: np.ndarray):
        """The same as `propose`, one draft step per iteration, so a caller can run the steps
        in the gaps of other work (dual-batch interleaving)."""
        st = self.batches[bid]
        B = st.last.shape[0]
        greedy = st.samp.all_greedy
        if not greedy:
            temp, top_k, top_p = st.samp.to(self.device)
            u = to_device(u_draft, self.device, torch.float32)
        # Built on the host (pending tokens are host lists): no device reads in the loop.
        toks = to_device([t for p in st.pending for t in p], self.device, torch.long)
        q_lens = to_device([len(p) for p in st.pending], self.device, torch.long)
        n_q = max((len(p) for p in st.pending), default=1)
        props, qs = [], []
        st.proposals, st.q = None, None
        for i in range(k):
            with torch.inference_mode():
                logits = self.draft.forward(st.draft_cache, toks, q_lens, n_q=n_q)  # [B, V]
                if greedy:
                    d = logits.argmax(-1)
                else:
                    q = probs_from_logits(logits[:, None], temp, top_k, top_p)[:, 0]
                    d = sample(q, u[:, i])
                    qs.append(q)
            props.append(d)
            toks, q_lens, n_q = d, torch.ones(B, dtype=torch.long, device=self.device), 1
            if i < k - 1:
                yield i
        st.proposals = torch.stack(props, 1) if k else torch.zeros(B, 0, dtype=torch.long, device=self.device)
        st.q = torch.stack(qs, 1) if qs else None
        yield k

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
        props = st.proposals if k else torch.zeros(logits.shape[0], 0, dtype=torch.long, device=self.device)
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
        st.proposals, st.q = None, None
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
        # The draft saw pending + d1..d_{k-1}; keep pending + d1..d_min(a, k-1).
        keep = st.draft_cache.lens - (k - 1) + (counts - 1).clamp(max=k - 1)
        st.draft_cache.truncate(keep)
        # Emitted tokens start with the accepted proposals, so d_k is tokens[b, k-1] when a = k.
        st.pending = [([int(tokens_h[b, k - 1])] if a[b] == k else []) + [last[b]] for b in range(len(last))]
