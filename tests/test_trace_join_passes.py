"""scripts/trace_join_passes.py: what a join costs the pass it rides and the pass after, read
from a trace with known stretches."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = str(Path(__file__).resolve().parents[1] / "scripts" / "trace_join_passes.py")
# (to draft, draft, to layer 0, layer 0, layers 1..) per kind of pass, ms
KINDS = {"S": (5, 30, 2, 20, 243), "J": (50, 30, 2, 60, 258), "A": (20, 70, 2, 20, 238)}


def _trace(path, order="SSSJASSJASS"):
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

