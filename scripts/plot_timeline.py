"""Render one round of a `--trace` timeline as a PNG: one lane per actor and stage.

    specoffload generate --model DIR --draft self:8 --trace trace.json
    python scripts/plot_timeline.py trace.json --out round.png [--round 2]

A round is one target pass: from the executor's first "L0 qkv" span of a batch to the start
of the next one. Needs matplotlib (pip install matplotlib).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys

COLORS = {"weight_copy": "#4c72b0", "cpu_attention": "#dd8452", "target": "#55a868", "draft": "#c44e52",
          "prefill": "#8172b3", "store_prefill": "#937860"}


def load_spans(path: str) -> list[dict]:
    """The complete ("X") spans of a trace file that bench --trace-dir or --trace wrote, plain
    or gzipped (the device machine's calls bring traces back as .json.gz)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        d = json.load(f)
    return [e for e in (d["traceEvents"] if isinstance(d, dict) else d) if e.get("ph") == "X"]


def rounds(events):
    """(start, end) of each target pass. A pass starts at the first layer-0 projection after
    any later layer ran: the layer-0 spans of every batch verified in the same pass (refill)
    belong to one pass."""
    starts, later = [], True
    for e in sorted((e for e in events if e["cat"] == "target"), key=lambda e: e["ts"]):
        if " L0 [" in e["name"]:
            if later and e["name"].endswith("qkv"):
                starts.append(e["ts"])
                later = False
        else:
            later = True
    return list(zip(starts, starts[1:]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--out", default="timeline.png")
    ap.add_argument("--round", type=int, default=1, help="which target pass to draw (0 = the first)")
    a = ap.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot_timeline: error: needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return 2
    try:
        events = json.load(open(a.trace))["traceEvents"]
    except (OSError, ValueError, KeyError) as e:
        print(f"plot_timeline: error: cannot read a trace from {a.trace} ({e})", file=sys.stderr)
        return 2
    rs = rounds(events)
    if not rs:
        print("plot_timeline: error: the trace holds no complete target pass", file=sys.stderr)
        return 2
    t0, t1 = rs[min(a.round, len(rs) - 1)]
    inside = [e for e in events if e["ts"] < t1 and e["ts"] + e["dur"] > t0]
    lanes = sorted({(e["pid"], e["cat"]) for e in inside})
    fig, ax = plt.subplots(figsize=(12, 0.6 * len(lanes) + 1.2))
    for y, (pid, cat) in enumerate(lanes):
        for e in inside:
            if (e["pid"], e["cat"]) == (pid, cat):
                s, d = max(e["ts"], t0), min(e["ts"] + e["dur"], t1) - max(e["ts"], t0)
                ax.broken_barh([((s - t0) / 1e3, d / 1e3)], (y - 0.35, 0.7), color=COLORS.get(cat, "gray"))
    ax.set_yticks(range(len(lanes)), [f"{p}: {c}" for p, c in lanes])
    ax.set_xlabel("ms since the start of the pass")
    ax.set_title(f"one target pass ({(t1 - t0) / 1e3:.1f} ms)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(a.out, dpi=90)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
