"""The backend the generation loop drives when the engine runs on Ray actors.

Every call is submitted ahead and returns an object ref; refs flow from one actor to the
next without the coordinator waiting (`ray.get` happens once per pass, on the few bytes of
accepted tokens). Proposals for a batch that is not being verified are split into single
draft steps and queued between the pass's layer calls, so the executor drafts in the gaps
while the CPU worker computes attention.
"""

from __future__ import annotations

import time

import ray

from ..placement.plan import split_range


class ActorBackend:
    def __init__(self, executor, attention, num_layers: int, prefill_batch: int, micro_batches: int = 1):
        self.ex, self.at = executor, attention
        self.L, self.P, self.M = num_layers, prefill_batch, micro_batches
        self._size: dict[int, int] = {}  # sequences per batch (micro-batches never exceed it)
        self._props: list[tuple] = []  # (bid, k, u) not yet submitted
        self._t_pass, self._t_draft = 1.0, 0.01
        self._submitted_at = {}
        self._own_steps: dict[int, int] = {}  # draft steps of a batch run just before its pass
        self._draft_steps, self._seen = 0, (0.0, 0)  # for measuring seconds per draft step
        self._timing_calls = 0

    def start(self, bid, prompts, samp, capacity, with_draft=False):
        self.ex.start.remote(bid, prompts, samp, capacity, with_draft)
        self.at.start.remote(bid, [len(p) for p in prompts], capacity, self.P)
        self._n = self._size[bid] = len(prompts)

    def prefill(self, bid, u_sample):
        n_sub = -(-self._n // self.P)
        for j in range(self.L):
            for s in range(n_sub):
                kv = self.ex.prefill_layer.remote(bid, s, j)
                self.at.store_prefill.remote(bid, s, j, kv)
        return self.ex.prefill_head.remote(bid, u_sample)

    def propose(self, bid, k, u_draft):
        self._props.append((bid, k, u_draft))
        self._draft_steps += k

    def _flush(self, only=None):
        rest = []
        for bid, k, u in self._props:
            if only is None or bid == only:
                self.ex.propose.remote(bid, k, u)
            else:
                rest.append((bid, k, u))
        self._props = rest

    def verify(self, bid, k, u_accept, u_sample):
        # The pass's clock starts before the batch's own proposals (they must precede its
        # verification); their steps are taken off again in `get`.
        self._own_steps[bid] = sum(kb for b, kb, _ in self._props if b == bid)
        self._flush(only=bid)
        gaps = self._props
        self._props = []
        # Spread each other batch's k draft steps over the pass's layers.
        step_at = {}
        for b, kb, u in gaps:
            self.ex.draft_begin.remote(b, kb, u)
            for i in range(kb):
                step_at.setdefault(min(self.L - 1, (i * self.L) // max(kb, 1)), []).append(b)
        self._submitted_at[bid] = time.perf_counter()
        m = len(split_range(self._size[bid], self.M))
        self.ex.verify_begin.remote(bid, k, m)
        # Layer by layer, micro-batch by micro-batch: the executor's queue alternates between
        # micro-batches, so it computes one while the CPU worker attends for another.
        a = [None] * m
        for j in range(self.L):
            for p in range(m):
                x = self.ex.target_layer.remote(bid, j, a[p], p)
                a[p] = self.at.attend.remote(bid, j, x)
            for b in step_at.get(j, []):
                self.ex.draft_step.remote(b)
        r = self.ex.verify_head.remote(bid, k, u_accept, u_sample, *a)
        self.at.rollback.remote(bid, k, r)
        for b, _, _ in gaps:
            self.ex.draft_finish.remote(b)
        return (bid, r)

    def get(self, handle):
        self._flush()
        if isinstance(handle, tuple):
            bid, ref = handle
            out = ray.get(ref)
            t = time.perf_counter() - self._submitted_at.pop(bid, time.perf_counter())
            self._t_pass = max(t - self._own_steps.pop(bid, 0) * self._t_draft, 0.5 * t)
            return out
        return ray.get(handle)

    def timings(self):
        """(seconds per target pass, seconds per draft step), measured; the draft figure is
        refreshed from the executor's CUDA-event totals every few calls."""
        self._timing_calls += 1
        if self._timing_calls % 8 == 1:
            draft_s = ray.get(self.ex.stats.remote()).get("draft_s", 0.0)
            d_s, d_n = draft_s - self._seen[0], self._draft_steps - self._seen[1]
            if d_n > 0 and d_s > 0:
                self._t_draft = d_s / d_n
                self._seen = (draft_s, self._draft_steps)
        return self._t_pass, self._t_draft

    def keep(self, bid, idx):
        self._size[bid] = len(idx)
        self.ex.keep.remote(bid, idx)
        self.at.keep.remote(bid, idx)

    def free(self, bid):
        self._size.pop(bid, None)
        self.ex.free.remote(bid)
        self.at.free.remote(bid)

    def stats(self) -> dict:
        ex, at = ray.get([self.ex.stats.remote(), self.at.stats.remote()])
        return ex | at


