"""Dashboard metrics: a run's counters and gauges read back from Ray's Prometheus endpoint.

Ray 2.60 runs the metrics agent even with include_dashboard=False, so the session's Ray
exports them: the port is the node's "MetricsExportPort" (random unless
`--metrics-export-port` / `_metrics_export_port` fixes it). Values reach the endpoint
through the agent's report interval (about 10 s here), so the test polls (30 s at most).
"""

from __future__ import annotations

import re
import time
import urllib.request

import pytest

from specoffload.actors.metrics import METRICS, RunMetrics, stage_rates
from specoffload.configs.sampling_params import SamplingParams
from specoffload.llm import LLM

LINE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(urls) -> str:
    for url in urls:
        try:
            return urllib.request.urlopen(url, timeout=5).read().decode()
        except OSError:
            continue
    return ""


def series(text: str, run: str) -> dict:
    """name -> value summed over the series tagged run=<run> (one per worker)."""
    out = {}
    for line in text.splitlines():
        m = LINE.match(line)
        if not m or not m["name"].startswith("ray_specoffload_"):
            continue
        if dict(LABEL.findall(m["labels"] or "")).get("run") != run:
            continue
        out[m["name"]] = out.get(m["name"], 0.0) + float(m["value"])
    return out


def metrics_urls(ray):
    urls = []
    for n in ray.nodes():
        if n.get("Alive") and n.get("MetricsExportPort", 0) > 0:
            urls += [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics",
                     f"http://127.0.0.1:{n['MetricsExportPort']}/metrics"]
    return urls


def test_run_metrics_on_prometheus_endpoint(ray_session, tiny_dir):
    ray = ray_session
    urls = metrics_urls(ray)
    assert urls, "no node exports metrics"
    prompts = [{"prompt_token_ids": [5 + i, 17, 33, 4 + 2 * i]} for i in range(5)]
    with LLM(str(tiny_dir("llama")), draft="self:2", batch_size=3, progress=False) as llm:
        run = llm.run_id
        outs = llm.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True))
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    assert tokens == 5 * 12

    want = {"ray_specoffload_tokens_generated_total": float(tokens),
            "ray_specoffload_requests_done_total": 5.0,
            "ray_specoffload_requests_queued": 0.0}
    deadline, got = time.time() + 30, {}
    while time.time() < deadline:
        got = series(scrape(urls), run)
        if all(got.get(k) == v for k, v in want.items()) and len(got) == len(METRICS):
            break
        time.sleep(1)
    assert {k: got.get(k) for k in want} == want, got
    names = {"ray_" + n + ("_total" if kind == "counter" else "") for n, (kind, _) in METRICS.items()}
    assert set(got) == names, got
    assert got["ray_specoffload_tokens_per_s"] > 0
    assert 0.0 <= got["ray_specoffload_acceptance_rate"] <= 1.0
    assert 0.0 < got["ray_specoffload_gpu_busy_fraction"] <= 1.0
    assert got["ray_specoffload_cpu_attention_s_per_layer"] > 0
    assert got["ray_specoffload_gpu_target_s_per_layer"] > 0
    assert got["ray_specoffload_weight_stream_gbps"] >= 0  # the CPU executor streams nothing


def test_stage_rates():
    prev = {"target_s": 1.0, "draft_s": 0.5, "prefill_s": 0.5, "weight_copy_s": 1.0, "weight_bytes": 0,
            "cpu_attention_s": 2.0, "wall_s": 10.0}
    cur = {"target_s": 3.0, "draft_s": 1.0, "prefill_s": 0.5, "weight_copy_s": 2.0, "weight_bytes": 4e9,
           "cpu_attention_s": 6.0, "wall_s": 15.0}
    r = stage_rates(prev, cur, passes=10, num_layers=4)
    assert r["specoffload_gpu_busy_fraction"] == pytest.approx(2.5 / 5)
    assert r["specoffload_weight_stream_gbps"] == pytest.approx(4.0)
    assert r["specoffload_cpu_attention_s_per_layer"] == pytest.approx(4.0 / 40)
    assert r["specoffload_gpu_target_s_per_layer"] == pytest.approx(2.0 / 40)
    assert "specoffload_cpu_attention_s_per_layer" not in stage_rates(prev, cur, passes=0, num_layers=4)


def test_metrics_never_fail_a_run(monkeypatch):
    """A broken metrics backend turns recording off; the engine's calls keep working."""
    import specoffload.actors.metrics as m

    class Broken:
        def __getattr__(self, name):
            raise RuntimeError("no metrics agent")

    monkeypatch.setattr(m, "_registry", {n: Broken() for n in METRICS})
    rm = RunMetrics("t", 4)
    rm.run_started(3)
    assert not rm.on
    rm.request_finished()
    rm.progress({"tokens": 5, "passes": 1})
    rm.run_finished({"tokens": 5, "passes": 1, "seconds": 1.0, "tokens_per_s": 5.0})
    assert RunMetrics("u", 4, enabled=False).m is None
