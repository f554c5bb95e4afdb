"""What a join costs the passes around it, from a bench trace (`bench --trace-dir`).

A pass that rows join, and the pass after it, are split into the same stretches as a steady
pass, from the end of the pass before: the gap to the batch's draft round (a join's draft start
and the merge of the rows before it happen there), the draft round, the gap to layer 0's first
q/k/v, layer 0 (a joining batch's first prefill layer rides it), and layers 1 to the last.
Medians per kind of pass, ms; and the median draft start (`prefill` span) of the joins. Where
the trace has the CPU worker's row work (its `rows` spans: a joining batch's start, the keep of
finished rows, the merge of joined ones), also its time per stretch and how far it ran past the
stretch's first layer-0 q/k/v, when the worker's attention for that layer may be waiting for it.

    python scripts/trace_join_passes.py tr/trace_single_kauto_m2.json[.gz]
"""

from __future__ import annotations

import argparse
import bisect
import statistics
import sys

from plot_timeline import load_spans

COLUMNS = ("to draft", "draft", "to layer 0", "layer 0", "layers 1..", "pass")


def _first_after(times: list[float], t: float) -> float | None:
    i = bisect.bisect_right(times, t)
    return times[i] if i < len(times) else None


def split(events: list[dict]) -> dict:
    """{"steady" | "join" | "after join": [stretches per pass]} and the joins' draft starts."""
    ends = sorted(e["ts"] + e["dur"] for e in events if e["name"] == "target" and e["tid"] == "target")
    starts = sorted((e for e in events if e["name"] == "prefill" and e["tid"] == "prefill"), key=lambda e: e["ts"])
    joins = starts[1:]  # the first is the batch's own prefill
    drafts = sorted((e["ts"], e["dur"]) for e in events if e["tid"] == "draft")
    draft_starts = [t for t, _ in drafts]

    def first_qkv(layer: int) -> list[float]:
        return sorted(e["ts"] for e in events if e["tid"] == "target" and e["name"].startswith(f"b0 L{layer} [0:")
                      and e["name"].endswith("qkv"))

    q0, q1 = first_qkv(0), first_qkv(1)
    join_idx = {bisect.bisect_right(ends, e["ts"]) - 1 for e in joins}
    row_work = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e["tid"] == "rows")

    def stretches(i: int):
        prev, nxt = ends[i], ends[i + 1]
        t = _first_after(draft_starts, prev)
        a, b = _first_after(q0, prev), _first_after(q1, prev)
        if t is None or a is None or b is None or b > nxt:
            return None
        dur = drafts[draft_starts.index(t)][1]
        out = ((t - prev) / 1e3, dur / 1e3, (a - t - dur) / 1e3, (b - a) / 1e3, (nxt - b) / 1e3, (nxt - prev) / 1e3)
        if row_work:
            mine = [(s, e) for s, e in row_work if prev <= s < nxt]
            busy = sum(e - s for s, e in mine)
            late = max([0.0] + [e - max(s, a) for s, e in mine if e > a])
            out += (busy / 1e3, late / 1e3)
        return out

    kinds = {"steady": [i for i in range(2, len(ends) - 1) if i not in join_idx and i - 1 not in join_idx],
             "join": sorted(join_idx), "after join": sorted(i + 1 for i in join_idx)}
    out = {k: [s for s in (stretches(i) for i in idx if 0 <= i < len(ends) - 1) if s] for k, idx in kinds.items()}
    return out, [e["dur"] / 1e3 for e in joins]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace", help="a trace_<mode>.json (or .json.gz) that bench --trace-dir wrote")
    a = ap.parse_args(argv)
    try:
        events = load_spans(a.trace)
    except (OSError, ValueError, KeyError) as e:
        print(f"trace_join_passes: cannot read {a.trace}: {e}", file=sys.stderr)
        return 2
    kinds, starts = split(events)
    if not kinds["steady"]:
        print(f"trace_join_passes: no target passes in {a.trace} (a run traced with bench --trace-dir?)",
              file=sys.stderr)
        return 2
    print(f"{'passes, median ms':16s} {'n':>4s} " + " ".join(f"{c:>10s}" for c in COLUMNS))
    for kind, rows in kinds.items():
        if rows:
            print(f"{kind:16s} {len(rows):4d} " + " ".join(f"{statistics.median(c):10.1f}"
                                                        for c in list(zip(*rows))[: len(COLUMNS)]))
    if any(len(r) > len(COLUMNS) for rows in kinds.values() for r in rows):
        print("the CPU worker's row work (start, keep, merge), median ms: in the stretch / past layer 0's first q/k/v")
        for kind, rows in kinds.items():
            if rows:
                busy, late = list(zip(*rows))[len(COLUMNS):]
                print(f"{kind:16s} {len(rows):4d} {statistics.median(busy):10.1f} {statistics.median(late):10.1f}"
                      f"   (max {max(late):.1f})")
    if starts:
        print(f"a join's draft start (the executor's prefill span): median {statistics.median(starts):.1f} ms "
              f"over {len(starts)} joins")
    return 0


if __name__ == "__main__":
    sys.exit(main())
