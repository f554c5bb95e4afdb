"""Rows busy per pass of a job refilled in place, simulated from its output lengths alone.

    python scripts/simulate_rows_busy.py --batch 192 --requests 768 --gen 32-256 --tokens-per-round 3.95

Each row needs ceil(length / tokens per round) rounds (its mean; acceptance noise left out);
finished rows are refilled once `--rows` are free, the joining rows busy in the pass their
prefill rides. Shows what refill can and cannot do: while requests wait the batch stays nearly
full, but once the queue is empty a finite job's batch drains for as long as its longest output.
"""

from __future__ import annotations

import argparse
import math

import numpy as np


def simulate(batch: int, rounds: list[int], rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(busy share per pass, whether requests waited at that pass)."""
    queue, live, joining, busy, waiting = list(rounds[batch:]), list(rounds[:batch]), [], [], []
    while live or queue or joining:
        busy.append((len(live) + len(joining)) / batch)
        waiting.append(bool(queue))
        live = [r - 1 for r in live if r > 1] + joining
        joining = []
        free = batch - len(live)
        if queue and free >= min(rows, len(queue)):
            joining, queue = queue[:free], queue[free:]
    return np.array(busy), np.array(waiting)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=192)
    ap.add_argument("--requests", type=int, default=768)
    ap.add_argument("--gen", default="32-256", help="Output lengths, drawn uniformly from LO-HI.")
    ap.add_argument("--tokens-per-round", type=float, default=1.0, help="1 for plain decoding.")
    ap.add_argument("--rows", type=int, default=16, help="Free rows a join waits for.")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    lo, hi = (int(x) for x in a.gen.split("-"))
    lens = np.random.default_rng(a.seed).integers(lo, hi + 1, a.requests)
    busy, waiting = simulate(a.batch, [math.ceil(n / a.tokens_per_round) for n in lens], a.rows)
    print(f"{len(busy)} passes: rows busy {busy.mean():.3f} mean, {(busy >= 0.9).mean():.3f} of passes at >= 90%; "
          f"{busy[waiting].mean():.3f} while requests waited ({waiting.mean():.3f} of passes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
