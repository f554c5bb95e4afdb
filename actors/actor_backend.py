"""The backend the generation loop drives when the engine runs on Ray actors.

Every call is submitted ahead and returns an object ref; refs flow from one actor to the
next without the coordinator waiting (`ray.get` happens once per pass, on the few bytes of
accepted tokens). Inside a pass the layers hand over by doorbell (plan.layer_doorbell,
actors/doorbell.py): only layer 0's and the last layer's hand-offs are refs. Verifications
queued together (the running batches of a refilled workload) run as one streamed pass: each
layer's weights serve every batch. Proposals for a batch that is not being verified are split
into single draft steps and queued between the pass's layer calls, so the executor drafts in
the gaps while the CPU worker computes attention.
"""

from __future__ import annotations

import time

import ray

from ..errors import SpecOffloadError
from ..placement import gpu_kv_rows
from . import kv_ring
from .doorbell import BELL, is_peer_failed


class RunStopped(Exception):
    """The driver asked the run to stop (Ctrl-C, SIGTERM): raised at the next pass boundary."""


class PassStalled(SpecOffloadError):
    """A target pass or prefill gave no result for plan.stall_s: the supervisor rebuilds the
    actors and the run goes on (actors/supervisor.py), as when one dies. `what`: what gave no
    result for how long, for the supervisor's restart line."""

    def __init__(self, message: str, what: str | None = None):
        super().__init__(message)
        self.what = what or message


class ActorBackend:
    def __init__(self, executor, attention, num_layers: int, prefill_batch: int, micro_batches: int = 1,
                 kv_ring: bool = False, doorbell: bool = False, gpu_kv_rows: int = 0, stall_s: float = 0.0,
                 worker_runs: bool = True, join_overlap: bool = False):
        self.ex, self.at = executor, attention
        self.stall_s = stall_s  # plan.stall_s: how long a result may take before the pass counts as stalled
        self._passes_timed = 0
        self.G = gpu_kv_rows  # plan.gpu_kv_rows: a batch's first rows attend on the GPU
        self._gpu: dict[int, int] = {}  # batch -> its GPU rows now (placement/gpu_kv_rows.py)
        self._gpu_cap: dict[int, int] = {}  # batch -> the GPU rows it started with (joins refill up to it)
        self.gpu_rows_joined = 0  # waiting requests that took a running batch's freed GPU rows (cumulative)
        self.submit_s = 0.0  # time issuing passes' calls (cumulative)
        self.joins_beside = 0  # joins whose prefill ran beside a pass's parts (cumulative, _overlaps)
        self.L, self.P, self.M = num_layers, prefill_batch, micro_batches
        # plan.layer_doorbell: inside a pass, layers hand over through the mailboxes' counters
        # (actors/doorbell.py), every call submitted at once with no Ray dependency between them
        self.doorbell = doorbell
        self.worker_runs = worker_runs  # plan.worker_layer_runs: the worker's middle layers in one call
        self.join_overlap = join_overlap  # plan.join_overlap: rows joining a pass prefill beside its parts
        self._pass_refs: dict[int, list] = {}  # batch -> its doorbell pass's calls (for its first error)
        # plan.shm_prefill: each prefill call waits for the store whose ring slot it reuses
        self.kv_ring = kv_ring
        self._ring_stores: dict[int, dict[int, object]] = {}  # batch -> call -> its store's ref
        self._size: dict[int, int] = {}  # sequences per batch (micro-batches never exceed it)
        self._props: list[tuple] = []  # (bid, k, u) not yet submitted
        self._t_pass, self._t_draft = 1.0, 0.01
        self._submitted_at = {}
        self._own_steps: dict[int, int] = {}  # draft steps of a batch run just before its pass
        self._verifies: list[tuple] = []  # verifications queued for the next pass
        self._results: dict[int, object] = {}  # batch -> ref of its verification's result
        self._prefill_stores: dict = {}  # prefill head ref -> (its batch, its layers' K/V store refs)
        # batch -> K/V store refs of its prefill not yet read: read before its rows are used
        # (`_stored`), the worker may still be storing when the executor's head is done
        self._unread_stores: dict[int, list] = {}
        self._draft_steps, self._seen = 0, (0.0, 0)  # for measuring seconds per draft step
        self._timing_calls = 0
        self._joins: list[tuple] = []  # (batch, u_sample) whose prefill rides the next pass
        self._join_heads: dict = {}  # joining batch -> its prefill head ref, once submitted
        self.stopping = False  # set from the coordinator's other thread (Coordinator.stop)

    def reset(self):
        """Forget calls queued but not submitted (a run that failed midway left them)."""
        self._props, self._verifies, self._joins = [], [], []
        self._join_heads.clear()
        self._ring_stores.clear()
        self._pass_refs.clear()
        self._unread_stores.clear()
        self.stopping = False

    def start(self, bid, prompts, samp, capacity, with_draft=False, joins=None):
        g = self._gpu[bid] = self._gpu_cap[bid] = self._joining_gpu_rows(joins, len(prompts))
        self.ex.start.remote(bid, prompts, samp, capacity, with_draft, joins, g)
        self.at.start.remote(bid, [len(p) for p in prompts], capacity, self.P, g)
        self._size[bid] = len(prompts)

    def gpu_rows(self, bid) -> int:
        """Rows [0, g) of batch bid keep their target K/V on the GPU (the generator orders a
        compaction by it: `gpu_kv_rows.keep_order`)."""
        return self._gpu.get(bid, 0)

    def _joining_gpu_rows(self, joins, n: int) -> int:
        """GPU rows for a batch of n: a new batch's first min(G, n); rows joining batch `joins`
        take the GPU rows its finished sequences freed first (their attention is off the CPU's
        chain), up to what it started with."""
        if joins is None:
            return min(self.G, n)
        return max(0, min(self._gpu_cap.get(joins, 0) - self._gpu.get(joins, 0), n))

    def join(self, bid, new, prompts, samp, capacity, with_draft, u_sample, ride=False):
        """Waiting requests that will take rows of batch bid, started as batch `new`. ride:
        their prefill layers run in the next target pass, each layer's weights serving it too
        (no stream of its own); else in a prefill pass of their own, now (the plain path)."""
        g = self._gpu[new] = self._joining_gpu_rows(bid, len(prompts))
        self._gpu_cap[new] = 0
        # The worker's cache of the joining rows only holds their prompts until `merge` copies
        # them into the batch's own rows: no larger than that. (Their GPU rows are rows the
        # batch already holds: GpuRows.spare.)
        longest = max(map(len, prompts))
        self.ex.start.remote(new, prompts, samp, capacity, with_draft, bid, g)
        self.at.start.remote(new, [len(p) for p in prompts], longest, self.P, g)
        self._size[new] = len(prompts)
        if not ride:
            return self.prefill(new, u_sample)
        self._joins.append((new, u_sample))
        return ("join", new)

    def merge(self, bid, new) -> list[int] | None:
        """Batch `new` (its first tokens out) takes rows of bid: its GPU rows after bid's GPU
        rows, its CPU rows after bid's CPU rows. Returns the merged batch's rows as indices into
        bid's live rows followed by new's (None: new's simply follow bid's)."""
        self._stored(new)  # the executor's merge removes new's ring: the worker must be done with it
        order = gpu_kv_rows.merge_order(self._size[bid], self._gpu.get(bid, 0), self._size[new], self._gpu[new])
        self.gpu_rows_joined += self._gpu[new]
        self._size[bid] += self._size.pop(new)
        self._gpu[bid] = self._gpu.get(bid, 0) + self._gpu.pop(new)
        self._gpu_cap.pop(new, None)
        self.ex.merge.remote(bid, new, order)
        self.at.merge.remote(bid, new)
        return order

    def _sub_batches(self, bid) -> int:
        """Prefill sub-batches of batch bid (a layer's prefill calls)."""
        return -(-self._size[bid] // self.P)

    def _prefill_calls(self, bid, j: int, in_pass: bool = False) -> list:
        """Layer j of batch bid's prefill, a sub-batch at a time, each call's store right after
        it (a later call of the same layer may reuse its ring slot); returns the store refs."""
        return [self._store(bid, s, j, self._prefill_kv(bid, j, s, in_pass)) for s in range(self._sub_batches(bid))]

    def _prefill_kv(self, bid, j: int, s: int, in_pass: bool = False, overlap: bool = False):
        """The executor's call for sub-batch s of layer j of batch bid's prefill (its K/V ref)."""
        if not self.kv_ring:
            return self.ex.prefill_layer.remote(bid, s, j, *((True,) if in_pass else ()))
        # call c reuses the slot of call c - SLOTS: it starts once that K/V is stored
        after = self._ring_stores.get(bid, {}).pop(j * self._sub_batches(bid) + s - kv_ring.SLOTS, None)
        return self.ex.prefill_layer.remote(bid, s, j, in_pass, after, *((True,) if overlap else ()))

    def _store(self, bid, s: int, j: int, kv, after=None):
        """The CPU worker's store of sub-batch s's layer-j K/V (after: a ref it waits for too)."""
        ref = self.at.store_prefill.remote(bid, s, j, kv, *(() if after is None else (after,)))
        if self.kv_ring:
            n_sub = self._sub_batches(bid)
            self._ring_stores.setdefault(bid, {})[j * n_sub + s] = ref
            if j == self.L - 1 and s == n_sub - 1:
                self._ring_stores.pop(bid, None)  # the batch's calls are all submitted
        return ref

    def _overlaps(self, bid) -> bool:
        """Whether batch bid's rows joining a pass prefill beside it (plan.join_overlap), their
        K/V stored a layer late: the layer's calls must fit half the ring, since a call waits
        for the store of the call SLOTS before it, which must already be submitted."""
        return self.join_overlap and self.kv_ring and 2 * self._sub_batches(bid) <= kv_ring.SLOTS

    def prefill(self, bid, u_sample):
        stores = []
        for j in range(self.L):
            stores += self._prefill_calls(bid, j)
        head = self.ex.prefill_head.remote(bid, u_sample)
        self._prefill_stores[head] = (bid, stores)
        return head

    def propose(self, bid, k, u_draft):
        self._props.append((bid, k, u_draft))
        self._draft_steps += k

    def _flush(self):
        for bid, k, u in self._props:
            self.ex.propose.remote(bid, k, u)
        self._props = []

    def verify(self, bid, k, u_accept, u_sample):
        """Queue batch `bid`'s verification; every batch queued before the next `get` is
        verified in the same streamed pass (each layer's weights serve them all)."""
        self._verifies.append((bid, k, u_accept, u_sample))
        return ("pass", bid)

    def _submit_pass(self):
        batches, self._verifies = self._verifies, []
        vids = {bid for bid, *_ in batches}
        # The pass's clock starts before the verified batches' own proposals (they must
        # precede their verification); their steps are taken off again in `get`.
        for bid in vids:
            self._own_steps[bid] = sum(kb for b, kb, _ in self._props if b == bid)
        own = [p for p in self._props if p[0] in vids]
        gaps = [p for p in self._props if p[0] not in vids]
        self._props = own
        self._flush()
        # Spread each other batch's k draft steps over the pass's layers.
        step_at = {}
        for b, kb, u in gaps:
            self.ex.draft_begin.remote(b, kb, u)
            for i in range(kb):
                step_at.setdefault(min(self.L - 1, (i * self.L) // max(kb, 1)), []).append(b)
        t0 = time.perf_counter()
        parts = []  # (batch, micro-batch) in the order the executor sees them each layer
        for bid, k, _, _ in batches:
            self._submitted_at[bid] = t0
            m = len(gpu_kv_rows.part_ranges(self._size[bid], self._gpu.get(bid, 0), self.M))
            self.ex.verify_begin.remote(bid, k, m)
            parts += [(bid, p) for p in range(m)]
        joins, self._joins = self._joins, []
        subs = sum(self._sub_batches(b) for b, _ in joins)
        self.ex.pass_begin.remote(len(parts) + subs)
        # Layer by layer, micro-batch by micro-batch: the executor's queue alternates between
        # micro-batches, so it computes one while the CPU worker attends for another. Joining
        # rows' prefill takes each layer after the pass's parts, while the layer is on the GPU.
        a = dict.fromkeys(parts)
        stores = {b: [] for b, _ in joins}
        late = {}  # joining batch -> its last layer's (sub-batch, K/V ref) not yet stored
        calls = []  # a doorbell pass's calls: none takes another's result, so none reports its error
        # The worker takes the layers between the first and the last in one call. Not with
        # joins: their K/V stores queue at the worker between layers, and an executor prefill
        # call waits for the store whose ring slot it reuses, so a run ahead of them would wait
        # on the executor while the executor waits on it.
        run = self.doorbell and self.worker_runs and not joins and self.L > 2  # layers 1..L-2 in one call
        for j in range(self.L):
            if run and j == 1:
                calls.append(self.at.attend_layers.remote(parts, 1, self.L - 1))
            for bid, p in parts:
                if self.doorbell and j > 0:  # layer 0's hand-off names the mailbox: it stays Ray's
                    calls.append(self.ex.target_layer.remote(bid, j, BELL, p))
                    if not (run and j < self.L - 1):
                        calls.append(self.at.attend.remote(bid, j, BELL, p))
                        a[(bid, p)] = calls[-1]
                    continue
                x = self.ex.target_layer.remote(bid, j, a[(bid, p)], p)
                a[(bid, p)] = self.at.attend.remote(bid, j, x, p)
                calls += [x, a[(bid, p)]]
            for b, _ in joins:
                if not self._overlaps(b):
                    joined = self._prefill_calls(b, j, in_pass=True)
                else:
                    # Beside the pass (gpu_executor.prefill_layer): the executor does not wait for
                    # a layer's K/V before it returns, so the worker stores them a layer late,
                    # once the next layer's first call (which waits for them) has returned, and
                    # a store never holds the worker's attention up meanwhile.
                    kvs = [self._prefill_kv(b, j, s, True, True) for s in range(self._sub_batches(b))]
                    self.joins_beside += j == 0
                    joined = [self._store(b, s, j - 1, kv, kvs[0]) for s, kv in late.pop(b, [])]
                    late[b] = list(enumerate(kvs))
                stores[b] += joined
                calls += joined  # a joining prefill that fails may be what failed the pass
            for b in step_at.get(j, []):
                self.ex.draft_step.remote(b)
        for bid, k, u_accept, u_sample in batches:
            r = self.ex.verify_head.remote(bid, k, u_accept, u_sample, *[a[x] for x in parts if x[0] == bid])
            self.at.rollback.remote(bid, k, r)
            self._results[bid] = r
            if self.doorbell:
                self._pass_refs[bid] = calls
        for b, u in joins:
            head = self._join_heads[b] = self.ex.prefill_head.remote(b, u)
            # the last layer's K/V, stored once the head (which waits for them) has returned
            stores[b] += [self._store(b, s, self.L - 1, kv, head) for s, kv in late.pop(b, [])]
            self._prefill_stores[head] = (b, stores[b])
        for b, _, _ in gaps:
            self.ex.draft_finish.remote(b)

    def get(self, handle):
        if isinstance(handle, tuple) and handle[0] == "pass":
            if self._verifies:
                t0 = time.perf_counter()
                self._submit_pass()
                self.submit_s += time.perf_counter() - t0
            _, bid = handle
            calls = self._pass_refs.pop(bid, None)
            try:
                out = self._wait(self._results.pop(bid), f"batch {bid}'s target pass")
            except PassStalled:
                raise
            except Exception as e:
                real = _first_error(e, calls) if calls else e
                if real is not e:
                    raise real from None
                raise
            self._stored(bid)  # a batch's first pass: were its prefill's K/V all stored?
            t = time.perf_counter() - self._submitted_at.pop(bid, time.perf_counter())
            self._t_pass = max(t - self._own_steps.pop(bid, 0) * self._t_draft, 0.5 * t)
            self._passes_timed += 1
            if self.stopping:
                raise RunStopped()
            return out
        if isinstance(handle, tuple):  # a join's prefill: it rode a pass, or runs on its own now
            _, bid = handle
            if bid not in self._join_heads:
                (u,) = [u for b, u in self._joins if b == bid]
                self._joins = [x for x in self._joins if x[0] != bid]
                self._join_heads[bid] = self.prefill(bid, u)
            handle = self._join_heads.pop(bid)
        self._flush()
        bid, stores = self._prefill_stores.pop(handle, (None, None))
        try:
            out = self._wait(handle, f"batch {bid}'s prefill" if bid is not None else "a prefill")
        except PassStalled:
            raise
        except Exception:
            # The head reports the prefill's first error; the K/V stores queued behind it failed
            # with it. Collect them, so that Ray does not log each one as an unhandled error.
            _read_quietly(stores)
            raise
        if stores:
            self._unread_stores[bid] = stores
        if self.stopping:
            raise RunStopped()
        return out

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
        self._gpu[bid] = gpu_kv_rows.split_keep(idx, self._gpu.get(bid, 0))[2]
        self.ex.keep.remote(bid, idx)
        self.at.keep.remote(bid, idx)

    def _stored(self, bid):
        """Wait until batch bid's prefill K/V are in the worker's cache, and raise what a store
        raised: the executor's prefill does not wait for them (the ring has slots to spare),
        so its first tokens can come first, and a store that failed unseen would leave rows
        attending without a layer's K/V (wrong tokens, not an error)."""
        stores = self._unread_stores.pop(bid, None)
        if stores:
            self._wait(stores, f"batch {bid}'s prefill K/V into the CPU worker's cache")

    def _wait(self, refs, what: str):
        """ray.get, but a result that takes longer than plan.stall_s (or 30 of this run's
        passes, once one was timed) raises PassStalled instead of waiting for ever: a side of
        the pass waits on something that will not come (session 29 met one on the GPU)."""
        if not self.stall_s:
            return ray.get(refs)
        limit = max(self.stall_s, 30 * self._t_pass if self._passes_timed else 0.0)
        many = isinstance(refs, list)
        _, left = ray.wait(refs if many else [refs], num_returns=len(refs) if many else 1, timeout=limit)
        if left:
            event = f"{what} gave no result for {limit:.0f} s"
            raise PassStalled(f"{event} (plan.stall_s {self.stall_s:g}): an engine actor is stuck", what=event)
        return ray.get(refs)

    def free(self, bid):
        _read_quietly(self._unread_stores.pop(bid, None))  # before the executor removes their ring
        self._size.pop(bid, None)
        self._gpu.pop(bid, None)
        self._gpu_cap.pop(bid, None)
        self.ex.free.remote(bid)
        self.at.free.remote(bid)

    def free_all(self):
        """Every batch still held (a stopped run's), on the executor and the CPU worker."""
        for bid in list(self._size):
            self.free(bid)

    def stats(self) -> dict:
        ex, at = ray.get([self.ex.stats.remote(), self.at.stats.remote()])
        # pass_submit_s: the driver's time issuing passes' calls (~2 per layer and part)
        return ex | at | {"gpu_rows_joined": self.gpu_rows_joined, "pass_submit_s": round(self.submit_s, 4),
                          "joins_beside": self.joins_beside}


def _read_all(refs: list | None, timeout: float) -> list[BaseException]:
    """Read every call, waiting at most `timeout` s for them, so that Ray logs none as
    unhandled: their errors, in call order."""
    if not refs:
        return []
    ray.wait(refs, num_returns=len(refs), timeout=timeout)
    errors = []
    for r in refs:
        try:
            ray.get(r, timeout=0)
        except Exception as e:  # noqa: BLE001 - the caller decides which, if any, to report
            errors.append(e)
    return errors


def _read_quietly(refs: list | None, timeout: float = 30):
    """Read calls whose errors are not the one to report (a failed prefill's stores, those of
    a batch being freed)."""
    _read_all(refs, timeout)


def _first_error(err: BaseException, calls: list) -> BaseException:
    """The error to report for a failed doorbell pass: its first call's that is not a
    consequence of another's (PeerFailed). Every call is read, so Ray logs none as unhandled."""
    if not is_peer_failed(err):
        return err
    return next((e for e in _read_all(calls, 60) if not is_peer_failed(e)), err)
