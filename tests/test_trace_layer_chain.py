"""scripts/trace_layer_chain.py: a layer's chain read from a trace, per micro-batch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = str(Path(__file__).resolve().parents[1] / "scripts" / "trace_layer_chain.py")


def _trace(path, passes=4, batches=1, joins=()):
    """Passes of two layers: a part of GPU rows only [0:2) and two parts the worker attends
    for ([2:5) and [5:8), its rows [0:3) and [3:6)), at known times (ms); with batches=2 a
    second batch verified in the same pass, its spans at the same times. Passes in `joins`
    carry a joining batch's prefill: per layer 7 ms on the device and 3 ms of K/V storing on
    the worker, and their layers start 30 ms apart, not 20."""
    ev = []

    def x(cat, name, t, dur):
        ev.append({"ph": "X", "cat": cat, "name": name, "ts": t * 1e3, "dur": dur * 1e3})

    for p in range(passes):
        for j in range(2):
            T = p * 100 + j * (30 if p in joins else 20)
            if p in joins:
                x("prefill", f"b9 L{j} s0", T + 3, 7)
                x("store_prefill", f"b9 L{j} s0", T + 11, 3)
            x("weight_copy", f"layer {j}", T - 16, 16)
            for b in range(batches):
                x("target", f"b{b} L{j} [0:2) qkv", T, 1)
                x("to_host", f"b{b} L{j} [0:2) qkv", T + 1, 0.5)
                x("target", f"b{b} L{j} [0:2) gpu attention", T + 1.5, 0.5)
                for lo, hi, at in ((2, 5, 4), (5, 8, 9)):
                    q = T + 2 * (lo > 2) + 2
                    x("target", f"b{b} L{j} [{lo}:{hi}) qkv", q, 1)
                    x("to_host", f"b{b} L{j} [{lo}:{hi}) qkv", q + 1, 0.5)
                    x("cpu_attention", f"b{b} L{j} [{lo - 2}:{hi - 2})", T + at, 5)
                for lo, hi, f in ((0, 2, 14), (2, 5, 15), (5, 8, 16)):
                    x("target", f"b{b} L{j} [{lo}:{hi}) ffn", T + f, 1)
    with open(path, "w") as fh:
        json.dump({"traceEvents": ev}, fh)


def _run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=60)


def _medians(stdout) -> dict:
    """{figure: ms} from the script's median lines, and the count of passes chosen."""
    got = {}
    for line in stdout.splitlines():
        name, value = line.rsplit(" ", 3)[0].strip(), float(line.split()[-3 if line.endswith("(median)") else -2])
        got[name] = value
    return got


@pytest.mark.parametrize("batches", [1, 2])
def test_chain_per_part(tmp_path, batches):
    """Each batch's parts are matched to its own worker calls (two batches in a pass: dual, or
    a refill's joining batch), so the per-part figures are the same with one batch or two."""
    t = tmp_path / "trace.json"
    _trace(t, batches=batches)
    r = _run(str(t), "--rounds", "0:3")
    assert r.returncode == 0, r.stderr
    got = _medians(r.stdout)
    assert got == {
        "passes (all)": 3, "layer to layer": 20.0, "weight copy": 16.0,
        "worker busy per layer": 10.0 * batches,  # two calls of 5 a batch; the GPU part has none
        "executor spans per layer": 8.0 * batches,  # 3 for the GPU part, 2.5 for each of the others
        "GPU rows' attention": 0.5,
        "part: gap before attention": 2.0,  # 0.5 and 3.5 (the second waits for the first)
        "part: attention": 5.0,
        "part: gap before FFN": 4.0,  # 6 and 2
        "part: FFN": 1.0,
        "part: gap FFN to next q/k/v": 6.5,  # 6 and 7
        "part: next q/k/v": 1.0,
        "part: its copy out": 0.5,
        "part: hand-off (attention to attention)": 15.0,
    }


def test_join_passes_apart_from_the_others(tmp_path):
    """--passes joins takes only the passes that carried a joining prefill, with its device
    and storing time per layer; --passes others the rest, as if no join had happened."""
    t = tmp_path / "trace.json"
    _trace(t, passes=5, joins=(1, 3))
    joins = _medians(_run(str(t), "--rounds", "0:4", "--passes", "joins").stdout)
    assert joins["passes (joins)"] == 2 and joins["layer to layer"] == 30.0
    assert joins["joining prefill: device per layer"] == 7.0
    assert joins["joining prefill: worker storing its K/V per layer"] == 3.0
    others = _medians(_run(str(t), "--rounds", "0:4", "--passes", "others").stdout)
    assert others["passes (others)"] == 2 and others["layer to layer"] == 20.0
    assert not any(k.startswith("joining prefill") for k in others)
    both = _medians(_run(str(t), "--rounds", "0:4").stdout)
    assert both["passes (all)"] == 4


def test_prefill_gaps(tmp_path):
    """The prefill's figures: 3 sub-batches a layer, 2 layers; each span 20 ms, the device idle
    2 ms between sub-batches and 5 ms between layers; each K/V copy out 18 ms of host time."""
    ev, t = [], 0.0
    for j in range(2):
        for s in range(3):
            ev.append({"ph": "X", "cat": "prefill", "name": f"b0 L{j} s{s}", "ts": t * 1e3, "dur": 20e3})
            ev.append({"ph": "X", "cat": "to_host", "name": f"b0 L{j} s{s} kv", "ts": (t + 3) * 1e3, "dur": 18e3})
            t += 22
        t += 3
    ev.append({"ph": "X", "cat": "prefill", "name": "prefill", "ts": 0, "dur": t * 1e3})  # the whole, not a layer
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": ev}))
    r = _run(str(path))
    assert r.returncode == 0, r.stderr
    got = _medians(r.stdout)
    assert got == {"prefill: device idle before the next sub-batch (n=4)": 2.0,
                   "prefill: device idle before the next layer (n=1)": 5.0,
                   "prefill: sub-batch layer on the device (n=6)": 20.0,
                   "prefill: K/V copy out (host) (n=6)": 18.0}


def test_a_trace_without_layers_is_a_one_line_error(tmp_path):
    t = tmp_path / "trace.json"
    t.write_text(json.dumps({"traceEvents": []}))
    r = _run(str(t))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no verification layers" in r.stderr
    r = _run(str(tmp_path / "missing.json"))
    assert r.returncode == 2 and "trace_layer_chain: error" in r.stderr and "Traceback" not in r.stderr
