"""Where a verification layer's time goes, from a `--trace` / `bench --trace-dir` timeline.

    python scripts/trace_layer_chain.py trace_single_kauto.json [--rounds 3:27]

For each layer of the chosen target passes (whole-batch passes, one micro-batch): the median
of the q/k/v projection, the gap until the CPU worker starts, the attention, the gap until the
FFN starts, the FFN, and how far apart consecutive layers start, against the weight copy.
This is how docs/benchmarks.md's runs 9 and 10 split a layer's ~57 ms chain.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict

from plot_timeline import rounds

_LAYER = re.compile(r" L(\d+) ")


def chain(events, lo: int, hi: int) -> dict:
    spans = sorted((e for e in events if e.get("ph") == "X"), key=lambda e: e["ts"])
    out = defaultdict(list)
    for a, b in rounds(spans)[lo:hi]:
        by = defaultdict(dict)
        for e in spans:
            if not a <= e["ts"] < b:
                continue
            if e["cat"] == "weight_copy":
                by[int(e["name"].split()[-1])]["copy"] = e
                continue
            m = _LAYER.search(f" {e['name']} ")
            if m and e["cat"] in ("target", "cpu_attention"):
                kind = "attention" if e["cat"] == "cpu_attention" else e["name"].split()[-1]
                by[int(m.group(1))].setdefault(kind, e)
        for j, d in by.items():
            if not {"qkv", "attention", "ffn"} <= set(d):
                continue
            q, at, f = d["qkv"], d["attention"], d["ffn"]
            out["qkv"].append(q["dur"])
            out["gap before attention"].append(at["ts"] - (q["ts"] + q["dur"]))
            out["attention"].append(at["dur"])
            out["gap before FFN"].append(f["ts"] - (at["ts"] + at["dur"]))
            out["FFN"].append(f["dur"])
            if "copy" in d:
                out["weight copy"].append(d["copy"]["dur"])
            nxt = by.get(j + 1, {}).get("qkv")
            if nxt:
                out["layer to layer"].append(nxt["ts"] - q["ts"])
    return {k: statistics.median(v) / 1e3 for k, v in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--rounds", default="3:27", help="which target passes, as lo:hi (the batch's full ones)")
    a = ap.parse_args(argv)
    try:
        lo, hi = (int(x) for x in a.rounds.split(":"))
        with open(a.trace) as f:
            events = json.load(f)["traceEvents"]
    except (ValueError, OSError, KeyError, json.JSONDecodeError) as e:
        print(f"trace_layer_chain: error: {e}", file=sys.stderr)
        return 2
    med = chain(events, lo, hi)
    if not med:
        print("trace_layer_chain: error: no verification layers with q/k/v, attention and FFN spans in those "
              "rounds", file=sys.stderr)
        return 2
    for k, v in med.items():
        print(f"{k:22} {v:6.1f} ms (median)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
