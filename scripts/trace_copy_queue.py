"""Whether attention outputs wait behind the weight copy, from a bench trace (`bench --trace-dir`).

The copy engine runs host-to-device copies in the order they were queued, so an attention
output coming back to the GPU by DMA waits behind the weight pieces queued ahead of it
(`plan.mapped_out` reads it with a kernel instead). For each micro-batch ("part") the CPU
worker attends for: the time from the end of its attention to the start of its FFN on the GPU,
split by whether a weight copy was running when the attention ended (medians; GPU and wall
clocks differ by ~1 ms, so a gap of ~0 may read slightly negative). Then, per pass without
joins, the pass against the weight copy's busy time in it: what the copy engine idled.

    python scripts/trace_copy_queue.py tr/trace_single_kauto_m2.json[.gz]
"""

from __future__ import annotations

import argparse
import bisect
import re
import statistics
import sys
from collections import defaultdict

from plot_timeline import load_spans, rounds

_SPAN = re.compile(r"^b(\d+) L(\d+) \[(\d+):(\d+)\)")


def analyse(events: list[dict], skip: int = 2) -> dict:
    """{"hand-off": {row: [ms...]}, "passes": [(pass ms, copy busy ms)]}, leaving out the first
    and last `skip` passes (start-up and drain)."""
    copies = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e["cat"] == "weight_copy")
    starts = [a for a, _ in copies]

    def copying(t: float) -> bool:
        i = bisect.bisect_right(starts, t) - 1
        return any(a <= t < b for a, b in copies[max(0, i - 2): i + 1])

    hand, passes = defaultdict(list), []
    for a, b in rounds(events)[skip: -skip or None]:
        inside = [e for e in events if a <= e["ts"] < b]
        if any(e["cat"] == "prefill" for e in inside):  # rows joined: their prefill rode this pass
            continue
        passes.append(((b - a) / 1e3, sum(min(y, b) - max(x, a) for x, y in copies if x < b and y > a) / 1e3))
        att, ffn = defaultdict(list), defaultdict(list)
        for e in inside:
            m = _SPAN.match(e["name"])
            if m and e["cat"] == "cpu_attention":
                att[(m.group(1), m.group(2))].append(e)
            elif m and e["cat"] == "target" and e["name"].endswith(" ffn"):
                ffn[(m.group(1), m.group(2))].append(e)
        for key, calls in att.items():
            # the worker's calls and the FFNs of a layer pair up in order (a part of GPU rows
            # only has an FFN and no call: it is the first, so the last len(calls) FFNs match)
            fs = sorted(ffn.get(key, []), key=lambda e: e["ts"])
            fs = fs[len(fs) - len(calls):] if len(fs) >= len(calls) else []
            for n, (at, f) in enumerate(zip(sorted(calls, key=lambda e: e["ts"]), fs)):
                end = at["ts"] + at["dur"]
                state = "while weights copy" if copying(end) else "with the copy idle"
                hand[f"part {n} {state}"].append((f["ts"] - end) / 1e3)
    return {"hand-off": hand, "passes": passes}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace", help="a trace_<mode>.json (or .json.gz) that bench --trace-dir wrote")
    a = ap.parse_args(argv)
    try:
        res = analyse(load_spans(a.trace))
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"trace_copy_queue: error: cannot read {a.trace}: {e}", file=sys.stderr)
        return 2
    print(f"{'attention end to FFN start, ms':40} {'n':>5} {'median':>7} {'p25':>7} {'p75':>7}")
    for row, v in sorted(res["hand-off"].items()):
        q = sorted(v)
        print(f"{row:40} {len(v):5d} {statistics.median(v):7.2f} {q[len(q) // 4]:7.2f} {q[3 * len(q) // 4]:7.2f}")
    if res["passes"]:
        ms, busy = zip(*res["passes"])
        print(f"passes without joins: {len(ms)}, median {statistics.median(ms):.1f} ms, weight copy busy "
              f"{statistics.median(busy):.1f} ms, idle {statistics.median([p - c for p, c in res['passes']]):.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
