"""The generation loop: batches, rounds, draft length, stopping. Backend-agnostic.

A backend runs the model work (the in-process reference backend, or the Ray actors); this
loop decides what to run and keeps every request's state. Backend calls return handles
that `backend.get` resolves, so an actor backend can queue a whole pass ahead.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from ..configs.run_config import RunConfig
from ..placement.gpu_kv_rows import keep_order
from ..placement.refill import refill_default
from ..speculation.logits_process import logits_settings
from ..speculation.sampler import SamplingTensors
from .request import Request
from .schedule import PassTimes, adaptive_k, alpha_from_accepted, steps


@dataclass
class RunStats:
    passes: int = 0
    tokens: int = 0
    proposed: int = 0
    accepted: int = 0
    seq_passes: int = 0  # sum over passes of sequences verified
    prefill_tokens: int = 0
    first_tokens: int = 0  # tokens that came out of prefill
    seconds: float = 0.0
    prefill_seconds: float = 0.0  # until every batch of each wave had its first token
    batches: int = 0  # batches started (each wave's; refilled rows join these)
    joins: int = 0  # times waiting requests took rows of a running batch
    joined: int = 0  # requests that did so
    join_retreats: int = 0  # joins that did not fit and went back to the queue (_retreat)
    busy_rows: list = field(default_factory=list)  # per pass: rows verified or joining / rows
    busy_waiting: list = field(default_factory=list)  # the same, over passes while requests waited
    k_history: list = field(default_factory=list)
    # per verification: (k, seconds the backend timed, whether adaptive k took it as its cost,
    # the batch's busy rows verified)
    pass_log: list = field(default_factory=list)
    # The loop's own time from a pass's result to its next call (applying tokens, refilling rows,
    # asking for proposals): under the single schedule the executor has nothing queued meanwhile.
    driver_seconds: float = 0.0

    def as_dict(self, log: bool = True) -> dict:
        """log: with `pass_log` (each verification's timing; left out of per-pass progress)."""
        d = {
            "passes": self.passes,
            "tokens": self.tokens,
            "prefill_tokens": self.prefill_tokens,
            "seconds": round(self.seconds, 4),
            "prefill_seconds": round(self.prefill_seconds, 4),
            "decode_tokens_per_s": round((self.tokens - self.first_tokens) / (self.seconds - self.prefill_seconds), 2)
            if self.seconds > self.prefill_seconds else 0.0,
            "tokens_per_s": round(self.tokens / self.seconds, 2) if self.seconds else 0.0,
            "acceptance": round(self.accepted / self.proposed, 4) if self.proposed else None,
            "tokens_per_seq_pass": round((self.tokens - self.first_tokens) / self.seq_passes, 4)
            if self.seq_passes else None,
            "k_mean": round(float(np.mean(self.k_history)), 3) if self.k_history else 0,
            "k_counts": {int(k): int(n) for k, n in zip(*np.unique(self.k_history, return_counts=True))},
            "k_last": int(self.k_history[-1]) if self.k_history else 0,
            "batches": self.batches,
            "joins": self.joins,
            "joined": self.joined,
            "join_retreats": self.join_retreats,
            # rows of the batch doing work (verified, or prefilled to join) over all its rows,
            # the mean over passes and the share of passes at 90% or more
            "rows_busy": _mean(self.busy_rows),
            "passes_rows_busy_90": _mean(np.array(self.busy_rows) >= 0.9),
            # what refill controls: once no request waits, a finite job's batch drains
            "rows_busy_while_waiting": _mean(self.busy_waiting),
            "passes_rows_busy_90_while_waiting": _mean(np.array(self.busy_waiting) >= 0.9),
            "driver_s": round(self.driver_seconds, 3),
        }
        if log:
            d["pass_log"] = [(int(k), round(float(t), 4), bool(u), int(r)) for k, t, u, r in self.pass_log]
        return d


def _mean(xs) -> float | None:
    """The mean to 4 places, None over no passes."""
    return round(float(np.mean(xs)), 4) if len(xs) else None


SETTLE_PASSES = 2  # a batch's passes that adaptive k does not take as k's cost (see `_step`)


def _is_capacity_error(err: BaseException) -> bool:
    """err is a CapacityError, or an actor's error that carries one."""
    from ..errors import CapacityError, root_cause

    return isinstance(err, CapacityError) or isinstance(root_cause(err), CapacityError)


def sampling_tensors(reqs: list[Request]) -> SamplingTensors:
    return SamplingTensors(
        temperature=np.array([r.params.temperature for r in reqs], np.float32),
        top_k=np.array([r.params.top_k for r in reqs], np.int64),
        top_p=np.array([r.params.top_p for r in reqs], np.float32),
        extra=logits_settings(reqs),
    )


class _Batch:
    def __init__(self, bid, reqs):
        self.bid, self.reqs = bid, list(reqs)
        self.k = 0  # draft length of the proposals made for the next verification
        self.has_proposals = False
        self.verified = 0  # target passes that have verified this batch
        self.alpha = 0.7  # running per-token acceptance estimate (prior before any measurement)
        self.joining = None  # (batch of waiting requests, its prefill handle) to merge after the next pass
        self.rng_states = []  # a joining batch's requests' sampling streams as they were before it

    def uniforms(self, n: int) -> np.ndarray:
        return np.stack([r.uniforms(n) for r in self.reqs]) if self.reqs else np.zeros((0, n), np.float32)


class Generator:
    def __init__(self, backend, cfg: RunConfig, on_finish=None, on_progress=None):
        self.backend, self.cfg = backend, cfg
        self.on_finish, self.on_progress = on_finish, on_progress
        self.stats = RunStats()
        self._next_bid = 0
        self.pass_times = PassTimes(unit=cfg.batch_size)  # keyed by query rows: a draining batch reaches longer k
        self._k_tried: set = set()  # draft lengths some pass has verified
        self._queue, self._cap = None, None  # requests waiting for rows (refill in place)
        self._join_cap = None  # most rows a join may take, once one did not fit (_retreat)

    # ------------------------------------------------------------------------------------
    def run(self, requests: list[Request]) -> RunStats:
        t0 = time.perf_counter()
        cfg = self.cfg
        n_batches = 2 if cfg.schedule == "dual" else 1
        queue = list(requests)
        # Refill in place: the first wave's batches keep their rows busy until the queue is
        # empty; their KV caches are sized for the longest request of the whole job.
        refill = refill_default(cfg.refill, len(queue), n_batches * cfg.batch_size)
        self._queue = queue if refill and len(queue) > n_batches * cfg.batch_size else None
        self._cap = self._capacity(queue) if self._queue is not None else None
        while queue:
            wave = []
            for _ in range(n_batches):
                if queue:
                    wave.append(queue[: cfg.batch_size])
                    del queue[: cfg.batch_size]
            self._run_wave(wave)
        self.stats.seconds = time.perf_counter() - t0
        return self.stats

    def _capacity(self, reqs) -> int:
        return max(len(r.prompt_ids) + r.params.max_tokens for r in reqs) + self.cfg.k_max + 2

    def _start(self, reqs: list[Request]):
        """A new batch: its target prefill (and the draft's) submitted; returns (batch, handle)."""
        b = _Batch(self._next_bid, reqs)
        self._next_bid += 1
        self.backend.start(b.bid, [r.prompt_ids for r in reqs], sampling_tensors(reqs), self._cap or self._capacity(reqs),
                           with_draft=self.cfg.schedule != "none")
        self.stats.prefill_tokens += sum(len(r.prompt_ids) for r in reqs)
        self.stats.batches += 1
        return b, self.backend.prefill(b.bid, b.uniforms(1)[:, 0])

    def _first_tokens(self, b: _Batch, handle):
        before = self.stats.tokens
        self._apply(b, self.backend.get(handle), k=0, prefill=True)
        self.stats.first_tokens += self.stats.tokens - before

    # -- refill in place ------------------------------------------------------------------
    def _deferred_joins(self) -> bool:
        """Whether a join's prefill rides the batch's next target pass (its rows join after it)
        rather than a prefill pass of its own. The dual schedule drafts for a batch during the
        other's pass, before that: there rows join at once."""
        return self.cfg.refill_prefill == "pass" and self.cfg.schedule != "dual"

    def _refill(self, b: _Batch):
        """Rows that finished in batch b go to waiting requests: those whose prefill rode the
        pass just done join now; then, once `refill_rows` rows are free (or the queue's last
        requests fit), the next ones start, to join after the next pass (or at once)."""
        if b.joining is not None:
            self._merge(b)
        q = self._queue
        free = self.cfg.batch_size - len(b.reqs)
        need = min(self.cfg.refill_rows, len(q), self._join_cap or len(q)) if q else 0
        if not q or free < need or free == 0:
            return
        n = min(free, self._join_cap or free)
        reqs = q[:n]
        del q[:n]
        nb = _Batch(self._next_bid, reqs)
        nb.rng_states = [r.rng.bit_generator.state for r in reqs]  # to start over exactly (_retreat)
        self._next_bid += 1
        self.stats.prefill_tokens += sum(len(r.prompt_ids) for r in reqs)
        self.stats.joins += 1
        self.stats.joined += len(reqs)
        h = self.backend.join(b.bid, nb.bid, [r.prompt_ids for r in reqs], sampling_tensors(reqs), self._cap,
                              self.cfg.schedule != "none", nb.uniforms(1)[:, 0], ride=self._deferred_joins())
        b.joining = (nb, h)
        if not self._deferred_joins():
            self._merge(b)

    def _merge(self, b: _Batch):
        nb, h = b.joining
        b.joining = None
        t0 = time.perf_counter()
        try:
            self._first_tokens(nb, h)  # rows that end at their first token leave before joining
        except Exception as e:
            if not (_is_capacity_error(e) and len(nb.reqs) > 1):
                raise
            self._retreat(nb, e)
            return
        if nb.reqs:
            # The backend says where the joining rows went (joining GPU rows follow the batch's
            # own: placement/gpu_kv_rows.merge_order); None: after the batch's rows.
            order = self.backend.merge(b.bid, nb.bid)
            reqs = b.reqs + nb.reqs
            b.reqs = reqs if order is None else [reqs[i] for i in order]
        else:
            self.backend.free(nb.bid)
        if not self._deferred_joins():
            self.stats.prefill_seconds += time.perf_counter() - t0

    def _retreat(self, nb: _Batch, err: Exception):
        """Rows joining a running batch did not fit (their prefill, inside a pass whose own
        activations, draft and graphs hold GPU memory too, or their draft state): they go back
        to the front of the queue as they were, and later joins take at most half as many rows,
        down to one, rather than the run failing and losing what it has done."""
        self.backend.free(nb.bid)
        for r, st in zip(nb.reqs, nb.rng_states):
            r.rng.bit_generator.state = st
        self._queue[:0] = nb.reqs
        self.stats.joins -= 1
        self.stats.joined -= len(nb.reqs)
        self.stats.prefill_tokens -= sum(len(r.prompt_ids) for r in nb.reqs)
        self.stats.join_retreats += 1
        self._join_cap = max(1, len(nb.reqs) // 2)
        warnings.warn(f"{len(nb.reqs)} rows joining a running batch did not fit ({str(err).splitlines()[0][:160]}); "
                      f"they wait, and joins take at most {self._join_cap} rows from now on", RuntimeWarning, stacklevel=2)

    def _run_wave(self, wave: list[list[Request]]):
        be, cfg = self.backend, self.cfg
        batches, handles = [], []
        t0 = time.perf_counter()
        for reqs in wave:
            b, h = self._start(reqs)
            batches.append(b)
            handles.append(h)
        for b, h in zip(batches, handles):
            self._first_tokens(b, h)
        self.stats.prefill_seconds += time.perf_counter() - t0
        batches = [b for b in batches if b.reqs]
        if not batches:
            return
        kind = cfg.schedule if not (cfg.schedule == "dual" and len(batches) < 2) else "single"
        if kind != "none":
            # The first proposals: for the batch verified first (single: every step's batch).
            self._propose(batches[0])
        by_id = {b.bid: b for b in batches}
        for step in steps(kind, [b.bid for b in batches]):
            for b in by_id.values():
                if not b.reqs and b.joining is not None:  # no pass left to ride: join now
                    self._merge(b)
                    if b.reqs and kind != "none":
                        self._propose(b)
            live = {bid for bid, b in by_id.items() if b.reqs}
            if not live:
                break
            if kind == "dual" and len(live) < 2:
                # One batch left: it continues alone on the single schedule.
                (bid,) = live
                b = by_id[bid]
                if not b.has_proposals:
                    self._propose(b)
                for step in steps("single", [bid]):
                    if not b.reqs:
                        break
                    self._step(step, by_id)
                break
            self._step(step, by_id)
        for b in by_id.values():
            be.free(b.bid)

    def _propose(self, b: _Batch):
        if not b.reqs:
            return
        if self.cfg.adaptive_k and self.pass_times.mean:
            _, t_draft = self.backend.timings()
            b.k = adaptive_k(b.alpha, self.pass_times, t_draft, self.cfg.k_max, rows=len(b.reqs),
                             tried=self._k_tried)
        else:
            b.k = self.cfg.k
        self.backend.propose(b.bid, b.k, b.uniforms(b.k))
        b.has_proposals = True

    def _step(self, step, by_id):
        be = self.backend
        verify = [by_id[i] for i in step.verify if by_id[i].reqs]
        handles = []
        # Draft for batches not verified now first: an actor backend interleaves these with
        # the pass's layer calls, so they run in the gaps.
        for i in step.propose:
            if i not in step.verify:
                self._propose(by_id[i])
        for b in verify:
            u = b.uniforms(b.k + 1)
            handles.append((b, b.k, len(b.reqs), be.verify(b.bid, b.k, u[:, : b.k], u[:, b.k])))
            b.has_proposals = False
        self.stats.passes += 1
        rode = [b for b in verify if b.joining is not None and self._deferred_joins()]  # a join rides this pass
        if verify:
            joining = sum(len(b.joining[0].reqs) for b in rode)
            rows = self.cfg.batch_size * len(verify)
            busy = min(1.0, (sum(len(b.reqs) for b in verify) + joining) / rows)
            self.stats.busy_rows.append(busy)
            if self._queue:
                self.stats.busy_waiting.append(busy)
        for b, k, rows, h in handles:
            res = be.get(h)
            got = time.perf_counter()
            if k:
                t = be.timings()[0]
                # Only a pass that did nothing else measures k's cost. Not a batch's first two:
                # its first (its prefill's last K/V stores still land) and, on W4, its second too
                # took 1.3-1.6x a steady pass in three runs (sessions 23 and 25: 2.30 s against
                # 1.64-1.74, 2.93 against 1.85-2.1, and 2.92 at k 4, which a lucky 2.26 at k 6
                # then outbid, settling a full batch at k 5-6 and 5% under fixed k 3). Nor the
                # first at a new k (buffers grow: W4, session 20, +0.9 s at k 5 against 1.9 s at
                # k 3), nor one a join rode.
                timed = b.verified >= SETTLE_PASSES and k in self._k_tried and b not in rode
                if timed:
                    self.pass_times.observe(k, t, rows)
                self._k_tried.add(k)
                self.stats.pass_log.append((k, t, timed, rows))
            b.verified += 1
            self._apply(b, res, k)
            if self._queue is not None:
                self._refill(b)
            if b.bid in step.propose:
                self._propose(b)
            self.stats.driver_seconds += time.perf_counter() - got

    def _apply(self, b: _Batch, res: tuple, k: int, prefill: bool = False):
        """res: (tokens [B, k+1], counts [B]) from the backend, plus the target's
        log-probabilities (logits_process.LogitsState.logprobs) when a sequence asked for them."""
        tokens, counts = res[0], res[1]
        lp = res[2] if len(res) > 2 else None
        keep = []
        for i, r in enumerate(b.reqs):
            n = int(counts[i])
            got = r.extend(tokens[i, :n], None if lp is None else {key: v[i, :n] for key, v in lp.items()})
            r.rounds += 1
            self.stats.tokens += got
            if k:
                self.stats.proposed += k
                self.stats.accepted += n - 1
            if r.done:
                if self.on_finish:
                    self.on_finish(r)
            else:
                keep.append(i)
        if k and b.reqs:
            self.stats.seq_passes += len(b.reqs)
            # choose_k models per-token acceptance, so convert the block's mean accepted count.
            b.alpha = 0.7 * b.alpha + 0.3 * alpha_from_accepted(float(np.mean(counts[: len(b.reqs)] - 1)), k)
            self.stats.k_history.append(k)
        elif b.reqs and not prefill:
            self.stats.seq_passes += len(b.reqs)
        if self.on_progress:
            self.on_progress(self.stats)
        if len(keep) < len(b.reqs):
            # GPU rows first, each side compacting in place (placement/gpu_kv_rows.py)
            keep = keep_order(keep, self.backend.gpu_rows(b.bid))
            b.reqs = [b.reqs[i] for i in keep]
            if keep or self._queue is not None:  # refilling: an emptied batch takes new rows
                self.backend.keep(b.bid, np.array(keep, dtype=np.int64))
