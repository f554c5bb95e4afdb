"""Schedules as data: which batches a target pass verifies and which the draft serves.

A `Step` verifies some batches in one streamed pass over the target's weights and drafts
for others. A batch in both is drafted *after* its verification (it needs the result);
a batch only in `propose` is drafted *during* the pass, in the gaps of the layer stream.

- non-speculative: every batch is verified in each pass, no draft;
- single: one batch, draft then verify, one after the other;
- dual: two batches; the pass verifies A while the draft proposes for B, then they swap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

SCHEDULES = ("none", "single", "dual")


@dataclass(frozen=True)
class Step:
    verify: tuple  # batch ids verified in this pass
    propose: tuple  # batch ids drafted in (or, if also verified, after) this pass


def steps(kind: str, batch_ids: list):
    """Yields the steps of a schedule forever; the loop drops finished batches itself."""
    if kind not in SCHEDULES:
        raise ConfigError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
    if kind == "none":
        while True:
            yield Step(tuple(batch_ids), ())
    elif kind == "single":
        i = 0
        while True:
            b = batch_ids[i % len(batch_ids)]
            yield Step((b,), (b,))
            i += 1
    else:
        if len(batch_ids) != 2:
            raise ConfigError("the dual schedule runs exactly two batches at a time")
        a, b = batch_ids
        while True:
            yield Step((a,), (b,))
            a, b = b, a


def expected_tokens(alpha: float, k: int) -> float:
    """Mean tokens per sequence per pass when each draft token is accepted with prob alpha."""
    if alpha >= 1.0:
        return k + 1.0
    return (1 - alpha ** (k + 1)) / (1 - alpha)


def alpha_from_accepted(mean_accepted: float, k: int) -> float:
    """The per-token acceptance probability alpha behind a measured mean of accepted draft
    tokens per block of k: acceptance stops at the first rejection, so the mean is
    alpha + alpha^2 + ... + alpha^k (not k * alpha); solved by bisection (monotone in alpha)."""
    target = min(max(float(mean_accepted), 0.0), float(k))
    if target >= k:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if sum(mid ** i for i in range(1, k + 1)) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


class PassTimes:
    """Seconds per target pass as a function of the query rows it verifies: rows x (k+1)
    tokens, so its CPU attention and GPU compute grow with k and with the batch's busy rows while
    the weight copy does not. As a finite job drains, a pass of fewer rows costs less at the
    same k, so a longer block fits in the time a full batch's shorter one took (session 23's W4
    passes fell from 1.7 to 1.3 s as rows finished).

    Times are kept per key rows x (k+1) / unit, rounded to a quarter: with unit the full batch,
    a full batch's key is k+1 and a drained batch's falls between (passes of a few rows more or
    less pool into one mean). Between keys seen it interpolates, beyond them it extends the
    nearest segment; the means are made non-decreasing (more query rows never cost less).

    Local, not one line through every k: the cost bends (copy-bound at small k, chain-bound
    above), and one slow pass at a far k tilted a global line so steeply that W4 (session 20)
    settled at k 1 for its whole run. A key not seen for `horizon` passes is forgotten for the
    same reason: contexts grow, and a one-off must not steer the rest of a run."""

    GRID = 4  # keys rounded to 1/GRID of a full batch's k+1

    def __init__(self, horizon: int = 24, unit: int = 1):
        self.mean: dict[float, float] = {}
        self.last: dict[float, int] = {}  # key -> the pass that last observed it
        self.horizon, self.passes, self.unit = horizon, 0, unit

    def _query(self, k: int, rows: int | None) -> float:
        """Query rows of a pass at k over `rows` busy rows (None: a full batch), in units."""
        return (self.unit if rows is None else rows) * (k + 1) / self.unit

    def key(self, k: int, rows: int | None = None) -> float:
        return round(self.GRID * self._query(k, rows)) / self.GRID

    def observe(self, k: int, seconds: float, rows: int | None = None):
        q = self.key(k, rows)
        self.passes += 1
        m = self.mean.get(q)
        self.mean[q] = seconds if m is None else 0.6 * m + 0.4 * seconds
        self.last[q] = self.passes
        for old in [j for j, n in self.last.items() if self.passes - n > self.horizon]:
            del self.mean[old], self.last[old]

    def seen(self, rows: int | None = None) -> tuple[float, float] | None:
        """(shortest, longest) draft length with a current estimate, for a batch of `rows`
        busy rows: the k whose query rows match the smallest and largest keys seen."""
        if not self.mean:
            return None
        per_k = (self.unit if rows is None else max(rows, 1)) / self.unit
        return min(self.mean) / per_k - 1, max(self.mean) / per_k - 1

    def _curve(self) -> tuple[list, list]:
        ks = sorted(self.mean)
        # pool adjacent violators: noise that makes a longer block look cheaper is averaged away
        blocks = []  # [sum, count] per pooled run of keys
        for k in ks:
            blocks.append([self.mean[k], 1])
            while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
                s, n = blocks.pop()
                blocks[-1][0] += s
                blocks[-1][1] += n
        ts = [s / n for s, n in blocks for _ in range(n)]
        return ks, ts

    def __call__(self, k: int, rows: int | None = None) -> float:
        if not self.mean:
            return 1.0
        ks, ts = self._curve()
        if len(ks) == 1:
            return ts[0]
        q = self._query(k, rows)
        i = min(max(int(np.searchsorted(ks, q)), 1), len(ks) - 1)  # the segment [i-1, i] nearest q
        slope = (ts[i] - ts[i - 1]) / (ks[i] - ks[i - 1])
        # below the fewest query rows seen the line may not fall under half that pass (the copy stays)
        return max(ts[i - 1] + slope * (q - ks[i - 1]), 0.5 * ts[0])


def choose_k(alpha: float, t_pass, t_draft_step: float, k_min: int, k_max: int, tried=None,
             margin: float = 0.0) -> int:
    """Draft length maximising tokens per second for one batch, given measured acceptance,
    target pass time (seconds, or a function of k such as `PassTimes`) and time per draft
    step (what the draft costs when it cannot hide). With `tried` (lengths run before) and a
    margin, a length not yet run must beat the best of those by that share to be chosen."""
    rates = {}
    best, best_rate = k_min, -1.0
    for k in range(k_min, k_max + 1):
        tp = t_pass(k) if callable(t_pass) else t_pass
        rates[k] = expected_tokens(alpha, k) / (tp + k * t_draft_step)
        if rates[k] > best_rate:
            best, best_rate = k, rates[k]
    known = [k for k in rates if tried and k in tried]
    if margin and known and best not in tried:
        best_known = max(known, key=lambda k: (rates[k], -k))
        if best_rate <= (1 + margin) * rates[best_known]:
            return best_known
    return best


K_REACH = 2  # adaptive k tries at most this far beyond the draft lengths it has timed
# A draining batch takes a draft length it has not run only for this much more predicted
# throughput than the best it has: a first pass at a new length costs a one-off (up to ~0.4 s in
# sessions 21-23's pass logs, 0.9 s in session 20's), and a drain has few passes to repay it.
# `scripts/simulate_drain_k.py --new-k-s 0.5` on W4's figures: choosing freely lost 1.6% against
# a fixed k 3, while this margin kept a 0.5% gain.
NEW_K_MARGIN = 0.1


def adaptive_k(alpha: float, pass_times: PassTimes, t_draft_step: float, k_max: int,
               rows: int | None = None, tried=None) -> int:
    """choose_k for a batch of `rows` busy rows, within reach of the query rows timed so far: a
    length far from them is a guess (one timed length looks flat, so the longest block would
    win), and a step at a time measures the bend before trusting it. As a batch drains, the
    same query rows reach a longer block; a length not in `tried` then needs NEW_K_MARGIN."""
    lo, hi = pass_times.seen(rows)
    draining = rows is not None and rows < pass_times.unit
    # a draining batch may go below the lengths its query rows have timed: those passes cost
    # less, not more, than any timed (and the margin keeps it from hopping between lengths)
    lo_k = 1 if draining else max(1, min(math.ceil(lo - 1e-9) - K_REACH, k_max))
    hi_k = max(1, min(k_max, math.floor(hi + 1e-9) + K_REACH))
    return choose_k(alpha, lambda k: pass_times(k, rows), t_draft_step, lo_k, hi_k, tried,
                    NEW_K_MARGIN if draining else 0.0)
