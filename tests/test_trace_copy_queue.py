"""scripts/trace_copy_queue.py: hand-offs split by whether the weight copy ran, and the copy
engine's idle time a pass, read from a trace with known gaps."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = str(Path(__file__).resolve().parents[1] / "scripts" / "trace_copy_queue.py")


def _trace(path, passes=8, gap_copying=5.0, gap_idle=0.5, join_at=None):
    ev = []

    def x(cat, name, t, dur, pid="gpu_executor"):
        ev.append({"ph": "X", "cat": cat, "tid": cat, "pid": pid, "name": name, "ts": t * 1e3, "dur": dur * 1e3})

    for n in range(passes):
        t = n * 100.0
        x("target", "b0 L0 [0:4) qkv", t, 1)
        x("weight_copy", "layer 1", t + 5, 10)  # running when part 0's attention ends, not part 1's
        x("cpu_attention", "b0 L0 [0:2)", t + 1, 10, "cpu_attention")
        x("target", "b0 L0 [0:4) ffn", t + 11 + gap_copying, 2)
        x("cpu_attention", "b0 L0 [2:4)", t + 12, 10, "cpu_attention")
        x("target", "b0 L0 [2:4) ffn", t + 22 + gap_idle, 2)
        x("target", "b0 L1 [0:4) qkv", t + 40, 1)
        if n == join_at:
            x("prefill", "b1 L0 s0", t + 30, 5)
    with open(path, "w") as f:
        json.dump({"traceEvents": ev}, f)


def _run(path):
    return subprocess.run([sys.executable, SCRIPT, str(path)], capture_output=True, text=True, check=True).stdout


def test_hand_offs_are_split_by_the_copy_and_passes_report_its_idle_time(tmp_path):
    p = tmp_path / "t.json"
    _trace(p)
    rows = {ln[:40].strip(): ln[40:].split() for ln in _run(p).splitlines()[1:-1]}
    # 8 pass starts make 7 passes (the last has no end); the first and last two are left out
    assert rows["part 0 while weights copy"][:2] == ["3", "5.00"]
    assert rows["part 1 with the copy idle"][:2] == ["3", "0.50"]
    assert set(rows) == {"part 0 while weights copy", "part 1 with the copy idle"}
    assert _run(p).splitlines()[-1] == "passes without joins: 3, median 100.0 ms, weight copy busy 10.0 ms, idle 90.0 ms"


def test_passes_rows_joined_are_left_out(tmp_path):
    p = tmp_path / "t.json"
    _trace(p, join_at=3)
    out = _run(p)
    assert out.splitlines()[-1].startswith("passes without joins: 2,")
    assert " 2    5.00" in out

