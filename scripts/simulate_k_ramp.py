"""How fast adaptive k climbs from its start at a full batch: the engine's rule against two
faster ones, on a pass-cost model, simulated (not measured).

    python scripts/simulate_k_ramp.py --passes 20 --seeds 5

A pass at draft length k costs `base + slope * k` seconds (`--curve`: `w1-long`, 0.225 + 0.0018 k,
fitted to session 41's best w1-long pass log, `docs/results/s41/call2/n7.log`, k 4-14 at 192
rows; `w4`, 1.45 + 0.14 k, the chain-bound W4 pass of `tests/test_speculative.py`), drafting
`--draft-step-s` a token, and the first pass at a length not run before 30% more (buffers, a
graph capture). 192 rows each accept a draft token with probability `--alpha` until the first
rejection. As in `scheduler/generator.py`: a batch's first SETTLE_PASSES passes and the first
at each new length are not timed, the acceptance estimate starts at 0.7 and moves 0.3 of the
way to each pass's measurement.

Rules: "step" is the engine's (`schedule.adaptive_k`: at most K_REACH beyond the longest length
timed). "reach" lets it go up to twice the longest timed. "flat-start" also picks the second
pass's length before any pass is timed, as if a pass cost the same at every k (the copy-bound
premise), up to twice the first. Prints tokens per second over the first `--passes` passes and
the lengths one seed chose.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from specoffload.scheduler.generator import SETTLE_PASSES
from specoffload.scheduler.schedule import K_REACH, PassTimes, adaptive_k, alpha_from_accepted, choose_k

CURVES = {"w1-long": (0.225, 0.0018), "w4": (1.45, 0.14)}
RULES = ("step", "reach", "flat-start")


def simulate(rule: str, base: float, slope: float, alpha_true: float, a, seed: int) -> tuple[float, list]:
    rng = np.random.default_rng(seed)
    pt, tried, k, alpha = PassTimes(unit=a.rows), set(), a.k, 0.7
    tokens = seconds = 0.0
    ks = []
    for p in range(a.passes):
        ks.append(k)
        t = (base + slope * k) * (1.0 if k in tried else 1.3)
        seconds += t + k * a.draft_step_s
        # accepted draft tokens per row: the first rejection ends the block
        accepted = np.minimum(rng.geometric(1 - alpha_true, a.rows) - 1, k)
        tokens += accepted.sum() + a.rows
        if p >= SETTLE_PASSES and k in tried:
            pt.observe(k, t)
        tried.add(k)
        alpha = 0.7 * alpha + 0.3 * alpha_from_accepted(float(accepted.mean()), k)
        if pt.mean and rule == "step":
            k = adaptive_k(alpha, pt, a.draft_step_s, a.k_max, tried=tried)
        elif pt.mean:
            lo, hi = pt.seen()
            top = min(a.k_max, math.floor(hi + 1e-9) + max(K_REACH, math.floor(hi + 1e-9)))
            k = choose_k(alpha, pt, a.draft_step_s, max(1, math.ceil(lo - 1e-9) - K_REACH), top)
        elif rule == "flat-start" and p == 0:
            k = choose_k(alpha, t, a.draft_step_s, 1, min(a.k_max, 2 * k))
    return tokens / seconds, ks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--curve", choices=sorted(CURVES), action="append", help="default: both")
    ap.add_argument("--alpha", type=float, action="append", help="default: 0.835 (w1-long's measured) and 0.6")
    ap.add_argument("--passes", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--rows", type=int, default=192)
    ap.add_argument("--k", type=int, default=4, help="the start length (RunConfig.k)")
    ap.add_argument("--k-max", type=int, default=16)
    ap.add_argument("--draft-step-s", type=float, default=0.004)
    a = ap.parse_args(argv)
    if not all(0 < x < 1 for x in a.alpha or [0.5]) or min(a.passes, a.seeds, a.rows, a.k) < 1 or a.k_max < a.k:
        ap.error("--alpha must be in (0, 1); --passes, --seeds, --rows, --k at least 1; --k-max at least --k")
    print(f"{'curve':8} {'alpha':>5} {'rule':10} {'tok/s':>8} {'x step':>7}  lengths (seed 0)")
    for curve in a.curve or sorted(CURVES):
        for alpha in a.alpha or [0.835, 0.6]:
            ref = None
            for rule in RULES:
                runs = [simulate(rule, *CURVES[curve], alpha, a, s) for s in range(a.seeds)]
                rate, ks = float(np.mean([r for r, _ in runs])), runs[0][1]
                ref = ref or rate
                print(f"{curve:8} {alpha:5.3f} {rule:10} {rate:8.1f} {rate / ref:7.3f}  {' '.join(map(str, ks[:12]))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
