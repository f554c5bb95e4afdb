"""scripts/trace_join_passes.py: what a join costs the pass it rides and the pass after, read
from a trace with known stretches."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = str(Path(__file__).resolve().parents[1] / "scripts" / "trace_join_passes.py")
# (to draft, draft, to layer 0, layer 0, layers 1..) per kind of pass, ms
KINDS = {"S": (5, 30, 2, 20, 243), "J": (50, 30, 2, 60, 258), "A": (20, 70, 2, 20, 238)}


# the CPU worker's row work in each kind of pass: (start after the pass before, ms)
ROWS = {"S": (1, 5), "J": (1, 3), "A": (2, 100)}


def _trace(path, order="SSSJASSJASS", rows=False):
    ev, end = [], 0.0

    def x(tid, name, t, dur):
        ev.append({"ph": "X", "cat": tid, "tid": tid, "pid": "gpu_executor", "name": name, "ts": t * 1e3,
                   "dur": dur * 1e3})

    x("prefill", "prefill", -200, 150)  # the batch's own prefill, not a join
    x("target", "target", end - 1, 1)
    for kind in order:
        to_draft, draft, gap, l0, rest = KINDS[kind]
        if kind == "J":
            x("prefill", "prefill", end + 1, 45)  # the joining rows' draft start
        if rows:
            x("rows", "b0 keep", end + ROWS[kind][0], ROWS[kind][1])
        t = end + to_draft
        x("draft", "b0 k=8", t, draft)
        t += draft + gap
        x("target", "b0 L0 [0:10) qkv", t, 1)
        x("target", "b0 L1 [0:10) qkv", t + l0, 1)
        end = t + l0 + rest
        x("target", "target", end - 1, 1)
    with open(path, "w") as f:
        json.dump({"traceEvents": ev}, f)


def test_each_kind_of_pass_is_split_into_its_stretches(tmp_path):
    p = tmp_path / "trace.json"
    _trace(p)
    out = subprocess.run([sys.executable, SCRIPT, str(p)], capture_output=True, text=True, check=True).stdout
    rows = {ln[:16].strip(): ln[16:].split() for ln in out.splitlines()[1:4]}
    for kind, key in (("steady", "S"), ("join", "J"), ("after join", "A")):
        stretches = [float(v) for v in rows[kind][1:]]
        assert stretches == [*map(float, KINDS[key]), float(sum(KINDS[key]))], kind
    assert rows["join"][0] == "2" and rows["after join"][0] == "2" and rows["steady"][0] == "5"  # the first two passes are left out (start-up)
    assert "median 45.0 ms over 2 joins" in out


def test_the_workers_row_work_past_layer_0(tmp_path):
    """With the worker's `rows` spans: their time in each stretch, and how far they ran past
    the stretch's first layer-0 q/k/v (the after-join merge here: 100 ms from 2 ms in, layer 0
    at 92 ms in)."""
    p = tmp_path / "trace.json"
    _trace(p, rows=True)
    out = subprocess.run([sys.executable, SCRIPT, str(p)], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith("the CPU worker's row work"))
    got = {ln[:16].strip(): ln[16:].split()[:3] for ln in lines[at + 1: at + 4]}
    assert got == {"steady": ["5", "5.0", "0.0"], "join": ["2", "3.0", "0.0"], "after join": ["2", "100.0", "10.0"]}
    # without them (traces before the spans): the stretches alone, as before
    _trace(p)
    out = subprocess.run([sys.executable, SCRIPT, str(p)], capture_output=True, text=True, check=True).stdout
    assert "row work" not in out
