"""Where a verification layer's time goes, from a `--trace` / `bench --trace-dir` timeline.

    python scripts/trace_layer_chain.py trace_single_kauto.json [--rounds 3:27]

For each layer of the chosen target passes: how far apart consecutive layers start, against
the weight copy, and how busy each side is in a layer (the CPU worker's attention calls; the
executor's GPU spans and its copies out). Then, per micro-batch ("part") that the CPU worker
attends for, the chain around its attention: the gap until the worker starts, the attention,
the gap until the executor's FFN starts, the FFN, the gap until the next layer's q/k/v, the
q/k/v and its copy out, and the whole hand-off from the end of one layer's attention to the
start of the next layer's for the same part. A part of GPU KV rows only (plan.gpu_kv_rows with
micro-batches) has no worker call and is counted in the executor's time only.
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

_LAYER = re.compile(r" L(\d+) \[(\d+):")


def _layers(spans, a, b) -> dict:
    """layer -> {"copy": span, "exec": {part lo: {kind: span}}, "worker": [spans in time order]}."""
    by = defaultdict(lambda: {"exec": defaultdict(dict), "worker": []})
    for e in spans:
        if not a <= e["ts"] < b:
            continue
        if e["cat"] == "weight_copy":
            by[int(e["name"].split()[-1])]["copy"] = e
            continue
        m = _LAYER.search(f" {e['name']} ")
        if not m:
            continue
        j, lo = int(m.group(1)), int(m.group(2))
        if e["cat"] == "cpu_attention":
            by[j]["worker"].append(e)
        elif e["cat"] == "target":
            kind = "gpu attention" if e["name"].endswith("gpu attention") else e["name"].split()[-1]
            by[j]["exec"][lo].setdefault(kind, e)
        elif e["cat"] == "to_host":
            by[j]["exec"][lo].setdefault("to_host", e)
    return by


def _cpu_parts(d) -> list[dict]:
    """The executor's parts that the worker attended for, matched to its calls in order: GPU
    rows come first in a batch, so the last len(worker) parts are the worker's."""
    parts = [d["exec"][lo] for lo in sorted(d["exec"])]
    calls = sorted(d["worker"], key=lambda e: e["ts"])
    if not calls or len(calls) > len(parts):
        return []
    out = []
    for part, at in zip(parts[len(parts) - len(calls):], calls):
        out.append({**part, "attention": at})
    return out


def chain(events, lo: int, hi: int) -> dict:
    spans = sorted((e for e in events if e.get("ph") == "X"), key=lambda e: e["ts"])
    out = defaultdict(list)
    end = lambda e: e["ts"] + e["dur"]  # noqa: E731
    for a, b in rounds(spans)[lo:hi]:
        by = _layers(spans, a, b)
        for j, d in by.items():
            first = [d["exec"][x].get("qkv") for x in sorted(d["exec"])]
            nxt = by.get(j + 1)
            if first and first[0] and nxt and nxt["exec"]:
                q1 = nxt["exec"][min(nxt["exec"])].get("qkv")
                if q1:
                    out["layer to layer"].append(q1["ts"] - first[0]["ts"])
            if "copy" in d:
                out["weight copy"].append(d["copy"]["dur"])
            if d["worker"]:
                out["worker busy per layer"].append(sum(e["dur"] for e in d["worker"]))
            spans_j = [e for p in d["exec"].values() for e in p.values()]
            if spans_j:
                out["executor spans per layer"].append(sum(e["dur"] for e in spans_j))
            nxt_parts = _cpu_parts(nxt) if nxt else []
            for i, p in enumerate(_cpu_parts(d)):
                at = p["attention"]
                if "qkv" in p:
                    sent = p.get("to_host", p["qkv"])
                    out["part: gap before attention"].append(at["ts"] - end(sent))
                out["part: attention"].append(at["dur"])
                # the FFN that finishes this layer for the part is recorded under this layer
                f = p.get("ffn")
                if f is None:
                    continue
                out["part: gap before FFN"].append(f["ts"] - end(at))
                out["part: FFN"].append(f["dur"])
                if i < len(nxt_parts):
                    n = nxt_parts[i]
                    if "qkv" in n:
                        out["part: gap FFN to next q/k/v"].append(n["qkv"]["ts"] - end(f))
                        out["part: next q/k/v"].append(n["qkv"]["dur"])
                    if "to_host" in n:
                        out["part: its copy out"].append(n["to_host"]["dur"])
                    out["part: hand-off (attention to attention)"].append(n["attention"]["ts"] - end(at))
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
        print("trace_layer_chain: error: no verification layers with q/k/v and attention spans in those rounds",
              file=sys.stderr)
        return 2
    for k, v in med.items():
        print(f"{k:42} {v:6.1f} ms (median)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
