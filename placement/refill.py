"""Refill in place, priced: when waiting requests take finished rows, and whether that is on.

A batch refilled in place keeps its rows busy, but each join costs something: the joining
rows' prefill (riding the batch's next pass: its GPU compute and the draft's priming, the copy
being shared; or a prefill pass of its own, which streams every weight again) and a new draft
step capture. Waiting for r free rows before a join trades rows idle (about r / 2 of the batch
on average while rows accumulate) against joins (rows finish at f per pass, so f / r joins per
pass). Waves instead cost, per wave, its slowest row's rounds plus a prefill.

No torch here: the planner and the run config import it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError

# Whether refill in place is on when neither the user nor `--plan auto` says (EngineArgs.refill
# None). By the model below it never costs more than waves once requests outnumber rows, and the
# planner turns it on there; without a plan it stays off until the GPU has run it (issue 20: a
# join's prefill riding a pass adds to that pass's GPU memory, unmeasured under a 24 GiB cap).
REFILL_BY_DEFAULT = False

# A join's cost in target passes, for runs without the planner's figures: riding the next pass
# it is the draft's priming and capture plus the joining rows' GPU compute under the copy; on
# its own, a whole streamed prefill pass. Riding: 0.03, fitted to w1-long on the GPU machine,
# where joins of 8 rows beat joins of 16 (2.96x plain against 2.86x, and 2.88x against 2.79x
# with the other way the attention output comes back: docs/benchmarks.md, W1-long "Session
# 41"); at 192 rows it picks 8 (0.125, the guess before, picked 16).
JOIN_PASSES = {"pass": 0.03, "own": 1.0}
# Rounds a request takes, for the same purpose (W1-long: ~144 tokens at ~4.5 per round).
ROUNDS_PER_REQUEST = 32


def refill_default(refill: bool | None, requests: int, in_flight: int) -> bool:
    """The one place that decides whether a run refills in place: the user's (or the planner's)
    choice, else REFILL_BY_DEFAULT when there are more requests than rows."""
    if refill is not None:
        return refill
    return REFILL_BY_DEFAULT and requests > in_flight


@dataclass(frozen=True)
class RefillPrice:
    batch: int  # rows of the batch
    pass_s: float  # one target pass (a round, drafting included)
    join_s: float  # what one join adds to the run
    rounds_per_request: float  # mean rounds a request needs

    def __post_init__(self):
        if self.batch < 1 or self.pass_s <= 0 or self.join_s < 0 or self.rounds_per_request <= 0:
            raise ConfigError(f"refill price needs batch >= 1, pass_s > 0, join_s >= 0, rounds > 0: {self}")

    def busy(self, rows: int) -> float:
        """Share of the batch's rows busy when joins wait for `rows` free rows."""
        return 1.0 - (rows - 1) / (2 * self.batch)

    def seconds_per_request(self, rows: int) -> float:
        """Run seconds per request when joins take `rows` rows at a time."""
        decode = self.rounds_per_request * self.pass_s / (self.batch * self.busy(rows))
        return decode + self.join_s / rows

    def best_rows(self) -> int:
        """The cheapest r: idle rows cost more and joins less as r grows, both convex, so their
        sum has one minimum, found by ternary search (the planner asks for thousands)."""
        lo, hi = 1, self.batch
        while hi - lo > 2:
            a, b = lo + (hi - lo) // 3, hi - (hi - lo) // 3
            if self.seconds_per_request(a) <= self.seconds_per_request(b):
                hi = b
            else:
                lo = a
        return min(range(lo, hi + 1), key=self.seconds_per_request)

    def seconds(self, requests: int, rows: int | None = None) -> float:
        """The job's decode and join seconds, refilled in place (first prefill not included),
        at the steady state's rate: every row busy but for those a join waits on."""
        rows = rows or self.best_rows()
        return requests * self.seconds_per_request(rows)

    def drain_s(self, slowest_rounds: float) -> float:
        """What the end of the job adds to `seconds`: once no request waits, the batch runs on
        until its slowest row ends (`slowest_rounds` after the last join, as a wave's slowest
        row), with rows falling idle, where the steady state counted the rows in flight as
        half a request each. W3's 192 requests in a batch of 128 took 2 batches' rounds, not
        1.5; w1-long's 768 spent about a third of its passes so (docs/benchmarks.md)."""
        return max(slowest_rounds - self.rounds_per_request / 2, 0.0) * self.pass_s


def default_refill_rows(batch: int, prefill: str) -> int:
    """Free rows a join waits for when no planner chose: the model's best at JOIN_PASSES."""
    if prefill not in JOIN_PASSES:
        raise ConfigError(f"refill_prefill must be one of {', '.join(JOIN_PASSES)}, got {prefill!r}")
    return RefillPrice(batch, 1.0, JOIN_PASSES[prefill], ROUNDS_PER_REQUEST).best_rows()


def waves_seconds(requests: int, in_flight: int, slowest_rounds: float, pass_s: float, prefill_s: float) -> float:
    """The same job in waves: each its prefill, then as many rounds as its slowest row needs."""
    return math.ceil(requests / in_flight) * (prefill_s + slowest_rounds * pass_s)
