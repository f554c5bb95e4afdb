"""--trace: a Chrome-trace timeline of the actors' stage spans, and its one-round plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from specoffload.configs.sampling_params import SamplingParams
from specoffload.llm import LLM


def test_trace_has_every_stage_per_layer(ray_session, tiny_dir, tmp_path):
    d = tiny_dir("llama")
    with LLM(str(d), draft="self:1", k=2, batch_size=2, progress=False, trace=True) as llm:
        llm.generate([{"prompt_token_ids": [1, 5, 7]}, {"prompt_token_ids": [1, 9]}],
                     [SamplingParams(max_tokens=6, ignore_eos=True), SamplingParams(max_tokens=2, ignore_eos=True)])
        trace = llm.trace()
    ev = trace["traceEvents"]
    cats = {e["cat"] for e in ev}
    assert {"target", "cpu_attention", "draft", "prefill", "rows"} <= cats
    # the worker's row work: the batch's cache made, and the finished row dropped from it
    rows = [e["name"] for e in ev if e["cat"] == "rows"]
    assert any(n.endswith(" start 2") for n in rows) and any(n.endswith(" keep 1") for n in rows), rows
    layers = {e["name"].split(" L")[1].split()[0] for e in ev if e["cat"] == "cpu_attention"}
    assert layers == {"0", "1", "2"}  # every layer of the tiny model
    assert all(e["dur"] >= 0 and e["ph"] == "X" for e in ev)
    # Each layer's attention on the CPU worker falls between that layer's q/k/v and FFN spans.
    qkv = min(e["ts"] for e in ev if " L1 " in e["name"] and e["name"].endswith("qkv"))
    att = min(e["ts"] for e in ev if e["cat"] == "cpu_attention" and " L1 " in e["name"])
    assert qkv <= att
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    png = tmp_path / "round.png"
    r = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "scripts" / "plot_timeline.py"), str(path),
                        "--out", str(png)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
