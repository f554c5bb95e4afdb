"""Schedules as data: which batches a target pass verifies and which the draft serves.

A `Step` verifies some batches in one streamed pass over the target's weights and drafts
for others. A batch in both is drafted *after* its verification (it needs the result);
a batch only in `propose` is drafted *during* the pass, in the gaps of the layer stream.

- non-speculative: every batch is verified in each pass, no draft;
- single: one batch, draft then verify, one after the other;
- dual: two batches; the pass verifies A while the draft proposes for B, then they swap.
"""

from __future__ import annotations

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
    """Seconds per target pass as a function of k, from the passes seen so far: a pass
    verifies k+1 tokens per sequence, so its CPU attention and GPU compute grow with k while
    the weight copy does not. A line through the per-k running means (one k seen: flat)."""

    def __init__(self):
        self.mean: dict[int, float] = {}

    def observe(self, k: int, seconds: float):
        m = self.mean.get(k)
        self.mean[k] = seconds if m is None else 0.6 * m + 0.4 * seconds

    def __call__(self, k: int) -> float:
        if not self.mean:
            return 1.0
        ks = np.array(list(self.mean), float)
        ts = np.array(list(self.mean.values()))
        if len(ks) == 1:
            return float(ts[0])
        slope = max(float(np.polyfit(ks, ts, 1)[0]), 0.0)  # noise must not make long blocks look free
        return float(ts.mean() + slope * (k - ks.mean()))


def choose_k(alpha: float, t_pass, t_draft_step: float, k_min: int, k_max: int) -> int:
    """Draft length maximising tokens per second for one batch, given measured acceptance,
    target pass time (seconds, or a function of k such as `PassTimes`) and time per draft
    step (what the draft costs when it cannot hide)."""
    best, best_rate = k_min, -1.0
    for k in range(k_min, k_max + 1):
        tp = t_pass(k) if callable(t_pass) else t_pass
        rate = expected_tokens(alpha, k) / (tp + k * t_draft_step)
        if rate > best_rate:
            best, best_rate = k, rate
    return best
