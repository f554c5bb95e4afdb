"""Where a verification layer's time goes, from a `--trace` / `bench --trace-dir` timeline.

    python scripts/trace_layer_chain.py trace_single_kauto.json[.gz] [--rounds 3:27]

For each layer of the chosen target passes (every batch verified in them): how far apart
consecutive layers start, against the weight copy, and how busy each side is in a layer (the CPU
worker's attention calls; the executor's GPU spans and its copies out, and of those the GPU
rows' attention). Then, per micro-batch ("part") that the CPU worker attends for, the chain
around its attention: the gap until the worker starts, the attention, the gap until the
executor's FFN starts, the FFN, the gap until the next layer's q/k/v, the q/k/v and its copy
out, and the whole hand-off from the end of one layer's attention to the start of the next
layer's for the same part. A part of GPU KV rows only (a batch whose rows are all on the GPU,
or session 23's traces, where GPU rows were a part of their own) has no worker call and counts
in the executor's time only.
This is how docs/benchmarks.md's runs 9 and 10 split a layer's ~57 ms chain.
Then the prefill's: a sub-batch's layer on the device, the device's idle time between
sub-batches and between layers, and the K/V copy out.

`--passes joins` takes only the chosen passes that rows joined (waiting requests' prefill rode
the pass: prefill spans inside it), `--passes others` only the rest, so that a job's join passes
can be set against its plain ones; join passes also report, per layer, the joining prefill's
time on the device and the worker's time storing its K/V.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from collections import defaultdict

from plot_timeline import load_spans, rounds

_LAYER = re.compile(r" b(\d+) L(\d+) \[(\d+):")
_PREFILL = re.compile(r"^b(\d+) L(\d+) s(\d+)$")


def _layers(spans, a, b) -> dict:
    """layer -> {"copy": span, "exec": {(batch, part lo): {kind: span}}, "worker": {batch: [spans]}}."""
    by = defaultdict(lambda: {"exec": defaultdict(dict), "worker": defaultdict(list)})
    for e in spans:
        if not a <= e["ts"] < b:
            continue
        if e["cat"] == "weight_copy":
            by[int(e["name"].split()[-1])]["copy"] = e
            continue
        m = _LAYER.search(f" {e['name']} ")
        if not m:
            continue
        bid, j, lo = (int(x) for x in m.groups())
        if e["cat"] == "cpu_attention":
            by[j]["worker"][bid].append(e)
        elif e["cat"] == "target":
            kind = "gpu attention" if e["name"].endswith("gpu attention") else e["name"].split()[-1]
            by[j]["exec"][(bid, lo)].setdefault(kind, e)
        elif e["cat"] == "to_host":
            by[j]["exec"][(bid, lo)].setdefault("to_host", e)
    return by


def _cpu_parts(d) -> dict:
    """(batch, n) -> the batch's n-th part that the worker attended for, with its call: the
    worker's calls for a batch match its parts in row order, and a batch's part of GPU rows
    only (its first, when there is one) has no call, so the last len(calls) parts are matched."""
    out = {}
    for bid, calls in d["worker"].items():
        parts = [d["exec"][key] for key in sorted(d["exec"]) if key[0] == bid]
        calls = sorted(calls, key=lambda e: e["ts"])
        if len(calls) > len(parts):
            continue
        for n, (part, at) in enumerate(zip(parts[len(parts) - len(calls):], calls)):
            out[(bid, n)] = {**part, "attention": at}
    return out


PASSES = ("all", "joins", "others")


def _joined(spans, a, b) -> bool:
    """Whether rows joined in the pass [a, b): a prefill layer span inside it."""
    return any(a <= e["ts"] < b and e["cat"] == "prefill" and _PREFILL.match(e["name"]) for e in spans)


def chain(events, lo: int, hi: int, passes: str = "all") -> dict:
    spans = sorted((e for e in events if e.get("ph") == "X"), key=lambda e: e["ts"])
    out = defaultdict(list)
    end = lambda e: e["ts"] + e["dur"]  # noqa: E731
    chosen = [(a, b) for a, b in rounds(spans)[lo:hi] if passes == "all" or _joined(spans, a, b) == (passes == "joins")]
    for a, b in chosen:
        by = _layers(spans, a, b)
        per_layer = defaultdict(lambda: defaultdict(float))  # joining prefill: layer -> kind -> ms
        for e in spans:
            m = _PREFILL.match(e["name"]) if a <= e["ts"] < b else None
            if m and e["cat"] in ("prefill", "store_prefill"):
                per_layer[int(m.group(2))][e["cat"]] += e["dur"]
        for d in per_layer.values():
            out["joining prefill: device per layer"].append(d["prefill"])
            out["joining prefill: worker storing its K/V per layer"].append(d["store_prefill"])
        cpu = {j: _cpu_parts(d) for j, d in by.items()}  # each layer's, read as this and as the next
        for j, d in by.items():
            nxt = by.get(j + 1)
            q0 = d["exec"][min(d["exec"])].get("qkv") if d["exec"] else None
            q1 = nxt["exec"][min(nxt["exec"])].get("qkv") if nxt and nxt["exec"] else None
            if q0 and q1:
                out["layer to layer"].append(q1["ts"] - q0["ts"])
            if "copy" in d:
                out["weight copy"].append(d["copy"]["dur"])
            if d["worker"]:
                out["worker busy per layer"].append(sum(e["dur"] for c in d["worker"].values() for e in c))
            spans_j = [e for p in d["exec"].values() for e in p.values()]
            if spans_j:
                out["executor spans per layer"].append(sum(e["dur"] for e in spans_j))
            for p in d["exec"].values():  # the GPU rows' attention, in the executor's spans above
                if "gpu attention" in p:
                    out["GPU rows' attention"].append(p["gpu attention"]["dur"])
            nxt_parts = cpu.get(j + 1, {})
            for key, p in cpu[j].items():
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
                if key in nxt_parts:
                    n = nxt_parts[key]
                    if "qkv" in n:
                        out["part: gap FFN to next q/k/v"].append(n["qkv"]["ts"] - end(f))
                        out["part: next q/k/v"].append(n["qkv"]["dur"])
                    if "to_host" in n:
                        out["part: its copy out"].append(n["to_host"]["dur"])
                    out["part: hand-off (attention to attention)"].append(n["attention"]["ts"] - end(at))
    med = {k: statistics.median(v) / 1e3 for k, v in out.items()}
    return {f"passes ({passes})": len(chosen), **med} if med else {}


def prefill(events) -> dict:
    """Medians over a trace's prefill (one layer of one sub-batch a span): the device's time a
    span, its idle time before the next sub-batch of the same layer and before the next
    layer's first, and the copy of the K/V out (host time, which includes waiting for the
    device). Empty without prefill spans."""
    spans = sorted((e for e in events if e.get("cat") == "prefill" and _PREFILL.match(e["name"])),
                   key=lambda e: e["ts"])
    if not spans:
        return {}
    out = defaultdict(list)
    for e, n in zip(spans, spans[1:]):
        (b, j, s), (b2, j2, s2) = (tuple(map(int, _PREFILL.match(x["name"]).groups())) for x in (e, n))
        gap = (n["ts"] - e["ts"] - e["dur"]) / 1e3
        if (b2, j2, s2) == (b, j, s + 1):
            out["device idle before the next sub-batch"].append(gap)
        elif b2 == b and j2 == j + 1 and s2 == 0:
            out["device idle before the next layer"].append(gap)
    out["sub-batch layer on the device"] = [e["dur"] / 1e3 for e in spans]
    out["K/V copy out (host)"] = [e["dur"] / 1e3 for e in events if e.get("cat") == "to_host"
                                  and e["name"].endswith(" kv")]
    return {f"prefill: {k} (n={len(v)})": statistics.median(v) for k, v in out.items() if v}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--rounds", default="3:27", help="which target passes, as lo:hi (the batch's full ones)")
    ap.add_argument("--passes", choices=PASSES, default="all",
                    help="of those, all, only the ones rows joined (their prefill rode the pass), or the others")
    a = ap.parse_args(argv)
    try:
        lo, hi = (int(x) for x in a.rounds.split(":"))
        events = load_spans(a.trace)
    except (ValueError, OSError, KeyError) as e:  # a JSONDecodeError is a ValueError
        print(f"trace_layer_chain: error: {e}", file=sys.stderr)
        return 2
    med, pre = chain(events, lo, hi, a.passes), prefill(events)
    if not med and not pre:
        print("trace_layer_chain: error: no verification layers with q/k/v and attention spans in those rounds,"
              " and no prefill", file=sys.stderr)
        return 2
    for k, v in {**med, **pre}.items():
        print(f"{k:56} {v:6d} chosen" if k.startswith("passes (") else f"{k:56} {v:6.1f} ms (median)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
