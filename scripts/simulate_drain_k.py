"""One wave of speculative decoding as its batch drains: a fixed draft length against one chosen
per pass from the busy rows, on a pass-cost model, simulated (not measured).

    python scripts/simulate_drain_k.py --batch 192 --gen 128 --alpha 0.80 --k 3 \
        --copy-s 1.34 --full-s 1.70 --draft-step-s 0.017

A pass costs the longer of the weight copy (`--copy-s`, whatever the rows) and a chain that
grows with the query rows it verifies, busy rows x (k+1): `--full-s` at a full batch and `--k`,
falling linearly to `--copy-s - --fixed-s` at none. Drafting adds `--draft-step-s` a draft token.
Each row accepts each draft token with probability `--alpha` until the first rejection, plus the
target's own token. `--new-k-s` adds a one-off to the first pass at each k the wave has not run
(session 20 saw up to ~0.9 s on W4; later runs' pass logs up to ~0.4 s).

Three rows: "fixed" keeps `--k`. "any k" keeps `--k` while the batch is full (so only the drain
differs) and, once rows have finished, picks each pass the k in 1..`--k-max` with the most
expected tokens per second for the rows still busy: what adaptive k does once its pass times
are keyed on query rows (`scheduler/schedule.PassTimes`). "by rows" is that with the engine's
rule for a length not yet run (`schedule.NEW_K_MARGIN`, or `--new-k-margin`). Prints passes,
decode seconds, tokens per second with `--prefill-s` added, rows busy, and the mean k at a full
batch and below half of it.
"""

from __future__ import annotations

import argparse

import numpy as np

from specoffload.scheduler.schedule import NEW_K_MARGIN, choose_k


def simulate(a, by_rows: bool, seed: int, margin: float = 0.0) -> tuple[float, ...]:
    """(passes, decode seconds, mean busy share, mean k at a full batch, mean k below half) of one wave."""
    rng = np.random.default_rng(seed)
    per_query = (a.full_s - (a.copy_s - a.fixed_s)) / (a.k + 1)  # chain seconds per full batch's query row

    def pass_s(k: int, rows: int) -> float:  # the target pass alone
        return max(a.copy_s, a.copy_s - a.fixed_s + per_query * rows * (k + 1) / a.batch)

    left = np.full(a.batch, a.gen)
    passes, seconds, busy, ks = 0, 0.0, [], []
    seen = set()
    while (left > 0).any():
        rows = int((left > 0).sum())
        k = a.k
        if by_rows and rows < a.batch:  # a full batch keeps --k: only the drain differs
            k = choose_k(a.alpha, lambda j: pass_s(j, rows), a.draft_step_s, 1, a.k_max, seen, margin)
        accepted = np.minimum(rng.geometric(1 - a.alpha, a.batch) - 1, k) if a.alpha < 1 else np.full(a.batch, k)
        left = np.where(left > 0, left - accepted - 1, left)
        passes += 1
        seconds += pass_s(k, rows) + a.draft_step_s * k + (a.new_k_s if k not in seen else 0.0)
        seen.add(k)
        busy.append(rows / a.batch)
        ks.append(k)
    busy, ks = np.array(busy), np.array(ks)
    drain = ks[busy < 0.5]
    return passes, seconds, float(busy.mean()), float(ks[busy == 1].mean()), float(drain.mean()) if len(drain) else 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=192)
    ap.add_argument("--gen", type=int, default=128, help="Tokens each row generates.")
    ap.add_argument("--alpha", type=float, default=0.8, help="Acceptance per draft token.")
    ap.add_argument("--k", type=int, default=3, help="The full batch's draft length.")
    ap.add_argument("--k-max", type=int, default=16)
    ap.add_argument("--copy-s", type=float, default=1.34, help="A pass's weight copy, seconds.")
    ap.add_argument("--full-s", type=float, default=1.70, help="A full batch's pass at --k, seconds (>= --copy-s).")
    ap.add_argument("--fixed-s", type=float, default=0.24,
                    help="What of the copy's time the chain has before its query rows cost anything.")
    ap.add_argument("--draft-step-s", type=float, default=0.017)
    ap.add_argument("--new-k-s", type=float, default=0.0, help="One-off seconds of the first pass at each new k.")
    ap.add_argument("--new-k-margin", type=float, default=NEW_K_MARGIN,
                    help="A k not yet run must promise this much more throughput (the engine's rule).")
    ap.add_argument("--prefill-s", type=float, default=0.0, help="Added to the decode time for tokens per second.")
    ap.add_argument("--seeds", type=int, default=20)
    a = ap.parse_args(argv)
    if not (a.batch >= 1 and a.gen >= 1 and 0 <= a.alpha <= 1 and 1 <= a.k <= a.k_max and a.seeds >= 1
            and 0 <= a.fixed_s <= a.copy_s <= a.full_s and a.new_k_s >= 0 and a.new_k_margin >= 0):
        ap.error("need batch, gen, seeds >= 1, 0 <= alpha <= 1, 1 <= k <= k-max, 0 <= fixed-s <= copy-s <= full-s, "
                 "new-k-s, new-k-margin >= 0")
    print("k        passes  decode s  tok/s  rows busy  k full  k below half")
    for name, by_rows, margin in (("fixed", False, 0.0), ("any k", True, 0.0), ("by rows", True, a.new_k_margin)):
        p, s, b, kf, kd = (float(np.mean(x)) for x in zip(*(simulate(a, by_rows, seed, margin)
                                                             for seed in range(a.seeds))))
        print(f"{name:8} {p:6.1f} {s:9.1f} {a.batch * a.gen / (s + a.prefill_s):6.1f} {b:10.3f} {kf:7.2f} {kd:13.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
