"""Replay a speculative round's weight copies and layer chain for two choices of which layers
stay resident: the first n (the engine's choice until session 32) and n spread among the
streamed layers (`placement.resident_layers`).

    python scripts/simulate_layer_order.py --layers 8 --slots 2 --compute-ms 35 --copy-ms 55 --draft-ms 45

The model is the engine's streaming: streamed layers copy in pass order, pass after pass, one
copy at a time, each into a slot that its previous layer has released (run); a layer runs once
the one before it has and its weights are in; the draft runs between passes while copies go
on. Defaults are w1-long's speculative round from session 32's trace (3 resident of 8 layers,
2 slots): a layer's chain ~35 ms, a copy ~55 ms, drafting ~45 ms. Prints, for each resident
count, the steady-state milliseconds a round in both orders.
"""

from __future__ import annotations

import argparse
import math
import sys


def round_ms(resident, layers: int, slots: int, compute_ms: float, copy_ms: float, draft_ms: float,
             rounds: int = 30, warm: int = 10) -> float:
    """Steady-state milliseconds a round (a pass plus its drafting), after `warm` rounds."""
    resident = set(resident)
    streamed = [j for j in range(layers) if j not in resident]
    queue = [(r, j) for r in range(rounds) for j in streamed]  # the copy order
    free = [0.0] * slots  # when each slot may take its next copy (inf: its layer has not run)
    copied = 0.0  # when the copy engine finishes what it was given
    ready = {}  # (round, layer) -> (its copy's end, its slot)

    def issue():
        nonlocal copied
        while queue and min(free) < math.inf:
            s = min(range(slots), key=free.__getitem__)
            copied = max(copied, free[s]) + copy_ms
            ready[queue.pop(0)] = (copied, s)
            free[s] = math.inf

    t, ends = 0.0, []
    issue()
    for r in range(rounds):
        for j in range(layers):
            if j in resident:
                t += compute_ms
                continue
            at, s = ready.pop((r, j))
            t = max(t, at) + compute_ms
            free[s] = t
            issue()
        t += draft_ms
        ends.append(t)
    return (ends[-1] - ends[warm - 1]) / (rounds - warm)


def main(argv=None) -> int:
    from specoffload.placement.resident_layers import resident_layers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--compute-ms", type=float, default=35.0, help="a layer's chain (attention, hand-off, GPU work)")
    ap.add_argument("--copy-ms", type=float, default=55.0, help="one streamed layer's weight copy")
    ap.add_argument("--draft-ms", type=float, default=45.0, help="drafting between passes (0: plain decoding)")
    a = ap.parse_args(argv)
    if a.layers < 1 or a.slots < 1 or min(a.compute_ms, a.copy_ms, a.draft_ms) < 0:
        print("simulate_layer_order: error: layers and slots >= 1, times >= 0", file=sys.stderr)
        return 2
    print(f"{a.layers} layers, {a.slots} slots, compute {a.compute_ms} ms, copy {a.copy_ms} ms, draft {a.draft_ms} ms")
    print("| resident | first n: ms/round | spread | spread layers |")
    print("| ---: | ---: | ---: | --- |")
    for n in range(a.layers):
        spread = resident_layers(a.layers, n)
        first = round_ms(range(n), a.layers, a.slots, a.compute_ms, a.copy_ms, a.draft_ms)
        even = round_ms(spread, a.layers, a.slots, a.compute_ms, a.copy_ms, a.draft_ms)
        print(f"| {n} | {first:.1f} | {even:.1f} | {list(spread)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
