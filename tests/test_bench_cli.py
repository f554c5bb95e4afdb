"""`specoffload bench` runs a named workload on the actors and prints its table."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def test_bench_tiny_workload_prints_ratios(tmp_path):
    """Every kind of mode on one set of actors, then --baseline-resident N: `none` again on
    actors of its own that keep N target layers resident, and every mode's ratio against it.
    (One bench run for both: each start builds two W1-shaped layers, 2.9 GB each.)"""
    import json

    env = dict(os.environ, RAY_AUTH_MODE="disabled", HOME=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "specoffload.cli", "bench", "--workload", "tiny", "--modes",
                        "none,single@2,single@auto/m2,dual+recompute@2,single+host@2", "--draft-window", "8",
                        "--baseline-resident", "1", "--json", str(tmp_path / "b.json")],
                       capture_output=True, text=True, timeout=500, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith(("none ", "single@"))]
    rows += [line.split() for line in r.stdout.splitlines() if line.startswith(("dual+", "single+"))]
    assert [row[0] for row in rows] == ["none", "single@2", "single@auto/m2", "dual+recompute@2", "single+host@2"]
    assert rows[0][3] == "1.00"  # the baseline's ratio to itself
    res = json.loads((tmp_path / "b.json").read_text())["results"]
    assert res[1]["acceptance"] is not None and res[1]["tokens"] == res[0]["tokens"] == 4 * 6
    # what the host was doing at the start (host_facts), printed and kept beside the figures
    host = json.loads((tmp_path / "b.json").read_text())["host"]
    assert host["cores"] == os.cpu_count() and 0 <= host["busy"] <= 1
    assert any(ln.startswith(f"host: {host['cpu']}, {host['cores']} cores") for ln in r.stdout.splitlines())
    assert res[1]["k_mean"] == 2 and 1 <= res[2]["k_mean"] <= 16  # fixed k, and k chosen by the loop
    # per mode, passes by draft length, and each verification's (k, seconds, timed for adaptive k)
    assert res[1]["k_counts"] == {"2": len(res[1]["pass_log"])} and all(k == 2 for k, *_ in res[1]["pass_log"])
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("draft lengths (k: passes): "))
    assert f"single@2 2:{len(res[1]['pass_log'])}" in line and "none" not in line
    # a pass's turn-around beside the pass: drafting, the generator's loop, issuing the next pass
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("per pass, ms (draft GPU / generator loop / "))
    for x in res:
        assert x["driver_s"] > 0 and x["pass_submit_s"] > 0
        ms = [f"{x[key] / x['passes'] * 1e3:.1f}" for key in ("draft_gpu_s", "driver_s", "pass_submit_s")]
        assert f"{x['mode']} {' / '.join(ms)}" in line
    # which side bounds a layer: the worker's attention and both sides' doorbell waits a layer
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("per layer of a pass, ms "))
    for x in res:
        ms = [f"{x[key] / (x['passes'] * 2) * 1e3:.1f}" for key in
              ("cpu_attention_s", "worker_bell_wait_s", "executor_bell_wait_s", "target_gpu_s")]
        assert f"{x['mode']} {' / '.join(ms)}" in line
    assert [r["micro_batches"] for r in res] == [1, 1, 2, 1, 1, 1]  # /m2 applies to its mode only
    assert res[3]["tokens"] == 4 * 6 and res[3]["acceptance"] is not None  # two batches of 2, drafted
    assert res[4]["tokens"] == 4 * 6 and res[4]["acceptance"] is not None
    # the fair baseline, on actors of its own
    assert "baseline actors up" in r.stdout and "'resident_layers': 1" in r.stdout
    assert [x["mode"] for x in res] == ["none", "single@2", "single@auto/m2", "dual+recompute@2", "single+host@2",
                                        "none+r1"]
    assert res[5]["tokens"] == res[0]["tokens"] and res[5]["acceptance"] is None
    # Streamed bytes count only the layer that is not resident (2.90 GB per W1-shaped layer).
    for row, streamed in ((res[0], 2), (res[5], 1)):
        assert row["stream_GBps"] == pytest.approx(2.90 * streamed / row["s_per_pass"], rel=0.05)
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("against none+r1"))
    assert "single@2" in line and "x e2e" in line


def test_bench_resident_beyond_the_model_exits_2():
    r = subprocess.run([sys.executable, "-m", "specoffload.cli", "bench", "--workload", "tiny", "--resident", "3"],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, RAY_AUTH_MODE="disabled"))
    assert r.returncode == 2 and "plan names layers [2] but the model has 2" in r.stderr
    assert "Traceback" not in r.stderr


def test_bench_bad_resident_exits_2():
    r = subprocess.run([sys.executable, "-m", "specoffload.cli", "bench", "--workload", "tiny", "--resident", "lots"],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, RAY_AUTH_MODE="disabled"))
    assert r.returncode == 2 and "--resident needs a count or 'auto', got 'lots'" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("workload,flags", [
    ("w1-long", ["--draft-window", "64", "--draft-sinks", "4", "--draft-fp8", "--slots", "4", "--prefill-batch", "16"]),
    ("w1", ["--draft-window", "64", "--draft-sinks", "4", "--draft-fp8", "--slots", "4", "--target-fp8"]),
    ("w1", ["--no-draft", "--slots", "2"])])
def test_bench_resident_auto_fills_what_the_gpu_account_leaves(workload, flags):
    """--resident auto keeps as many target layers as fit the cap beside the run's own slots,
    draft and draft KV by the planner's account: n fit, n + 1 would not. Without a GPU: none."""
    from dataclasses import replace

    from specoffload.bench import _options, _resident, workload_shapes
    from specoffload.placement.cost_model import CostModel
    from specoffload.placement.draft_kv import DraftKV
    from specoffload.placement.planner import Candidate, Workload, _gpu_bytes
    from specoffload.sources.constructed import constructed_pair

    a = _options(["--workload", workload, "--resident", "auto", "--gpu-memory", "24GiB", *flags])
    tspec, dspec = workload_shapes(a.workload, a.target_layers, a.draft_layers)
    if a.target_fp8:
        from specoffload.sources.fp8_quantize import Fp8Quantized

        tspec = Fp8Quantized(constructed_pair(tspec, dspec, 0.8)[0]).spec
    assert _resident(a, tspec, dspec, cuda=False) == 0
    n = _resident(a, tspec, dspec, cuda=True)
    draft = None if a.no_draft else dspec
    c = Candidate("none" if draft is None else "single", a.batch, k=a.k, draft_fp8=a.draft_fp8, slots=a.slots,
                  prefill_batch=a.prefill_batch,
                  kv=DraftKV("gpu", a.draft_window, a.draft_sinks if a.draft_window else 0, a.draft_kv_fp8))
    wl = Workload(a.prompt_len, a.gen, a.batch, a.agreement)
    assert 0 < n < tspec.num_layers
    assert _gpu_bytes(tspec, draft, 0, replace(c, resident=n), wl, CostModel()) <= 24 * 2**30
    assert _gpu_bytes(tspec, draft, 0, replace(c, resident=n + 1), wl, CostModel()) > 24 * 2**30


@pytest.mark.parametrize("flag,value,msg", [
    ("--copy-chunk-mib", "64,0", "--copy-chunk-mib needs a comma list of sizes >= 1, got '64,0'"),
    ("--micro-batches", "two", "--micro-batches needs a comma list of counts >= 1, got 'two'"),
    ("--doorbell", "1,2", "--doorbell needs a comma list of 0 and 1, got '1,2'"),
    ("--batch", "0", "argument --batch: needs a count >= 1 or 'max', got '0'"),
    ("--batch", "most", "argument --batch: needs a count >= 1 or 'max', got 'most'"),
    ("--accelerate", "0:3", "argument --accelerate: needs N >= 1 requests and T >= 1 tokens, got 0:3"),
    ("--accelerate", "8:x", "argument --accelerate: needs N[:T[:RESERVE]] with whole numbers N and T, got '8:x'"),
    ("--accelerate", "8:3:lots", "argument --accelerate: cannot read a size from 'lots'"),
])
def test_bench_bad_lists_exit_2_before_the_actors_start(flag, value, msg):
    r = subprocess.run([sys.executable, "-m", "specoffload.cli", "bench", "--workload", "tiny", flag, value],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, RAY_AUTH_MODE="disabled"))
    assert r.returncode == 2 and msg in r.stderr
    assert "Traceback" not in r.stderr and "actors up" not in r.stdout


def test_bench_bad_baseline_resident_exits_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "specoffload.cli", "bench", "--workload", "tiny",
                        "--baseline-resident", "7"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, RAY_AUTH_MODE="disabled"))
    assert r.returncode == 2 and "--baseline-resident: needs 1..1 layers or 'auto', got 7" in r.stderr


@pytest.mark.parametrize("modes,msg", [("none,single@x", "draft length in 'single@x' must be 1..16 or 'auto'"),
                                        ("single@4/m0", "micro-batch count in 'single@4/m0' must be 1..64")])
def test_bench_bad_mode_exits_2(modes, msg):
    r = subprocess.run([sys.executable, "-m", "specoffload.cli", "bench", "--workload", "tiny", "--modes",
                        modes], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and msg in r.stderr
    assert "Traceback" not in r.stderr


def test_bench_accelerate_is_for_w1_shapes_only():
    r = subprocess.run([sys.executable, "-m", "specoffload.cli", "bench", "--workload", "w4", "--accelerate", "8"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--accelerate builds W1's Mixtral-shaped target, not w4's" in r.stderr
    assert "Traceback" not in r.stderr


def test_bench_unknown_workload_exits_2():
    r = subprocess.run([sys.executable, "-m", "specoffload.cli", "bench", "--workload", "w9"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "invalid choice: 'w9'" in r.stderr


def test_bench_w3_tiny_runs_qwen3_moe_shapes(tmp_path):
    """W3's constructed pair (a Qwen3-30B-A3B-shaped target: 128 experts of 768, top-8, two of
    its layers; a Qwen3-0.6B-shaped draft layer) runs on the CPU, speculating."""
    import json

    env = dict(os.environ, RAY_AUTH_MODE="disabled", HOME=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "specoffload.cli", "bench", "--workload", "w3-tiny", "--modes",
                        "none,single@2", "--json", str(tmp_path / "b.json")],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "W3 (target qwen3_moe 2 layers, 1.25 GB/layer" in r.stdout
    res = json.loads((tmp_path / "b.json").read_text())["results"]
    assert [x["tokens"] for x in res] == [4 * 6, 4 * 6] and res[1]["acceptance"] is not None


def test_plan_w3_shapes(tmp_path):
    r = subprocess.run([sys.executable, "-m", "specoffload.cli", "plan", "--shapes", "w3", "--hardware",
                        os.path.join(os.path.dirname(__file__), "..", "configs", "hardware", "h200_measured.json"),
                        "--gpu-memory", "24GiB", "--json", str(tmp_path / "p.json")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    best = json.loads((tmp_path / "p.json").read_text())["best"]
    assert best["schedule"] in ("single", "dual") and best["batch"] >= 64


def test_bench_w1_long_tiny_job(tmp_path):
    """w1-long's short form: a job of mixed prompt lengths whose outputs end by EOS at drawn
    lengths, the same requests for every mode, rows refilled in place, rows busy reported; then
    transformers + accelerate on the first 2 of those requests in the same call, and each
    mode's ratio to it (issue 20: what users run instead, from one run)."""
    import json

    import numpy as np

    from specoffload.bench_job import JobShape

    pytest.importorskip("accelerate")  # a test extra: CI has it
    env = dict(os.environ, RAY_AUTH_MODE="disabled", HOME=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "specoffload.cli", "bench", "--workload", "w1-long-tiny", "--modes",
                        "none,single@2", "--no-warmup", "--gpu-kv-rows", "2", "--accelerate", "2:2",
                        "--json", str(tmp_path / "b.json")],
                       capture_output=True, text=True, timeout=400, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "rows busy" in r.stdout
    res = json.loads((tmp_path / "b.json").read_text())["results"]
    shape = JobShape(requests=12, prompt_lo=8, prompt_hi=32, gen_lo=3, gen_hi=12)
    rng = np.random.default_rng(shape.seed)
    shape.prompt_lengths(rng)
    want = int(shape.gen_lengths(rng).sum())  # every output ends by EOS at its drawn length
    assert [x["tokens"] for x in res] == [want, want] and [x["requests"] for x in res] == [12, 12]
    assert all(x["joins"] > 0 and 0 < x["rows_busy"] <= 1 and x["time_to_last_s"] > 0 for x in res)
    # the first two rows attend on the "GPU" (here the executor's CPU): rows that join take
    # them once they finish, so both sides attend for the whole job, not only its first wave
    assert all(x["gpu_kv_rows"] == 2 and x["gpu_rows_joined"] > 0 and x["cpu_row_tokens"] > 0 for x in res)
    assert "rows into GPU rows" in r.stdout
    # each verification's busy rows are logged: the job drains to a row or two at its end
    spec = res[1]["pass_log"]
    assert spec[0][3] == 4 and min(p[3] for p in spec) < 2 and "(a full batch; draining below half)" in r.stdout
    acc = json.loads((tmp_path / "b.json").read_text())["accelerate"]
    lens = shape.prompt_lengths(np.random.default_rng(shape.seed))
    assert acc["layers"] == 1 and acc["requests"] == 2 and acc["tokens"] == 2 and acc["tokens_per_s"] > 0
    assert acc["longest_prompt"] == max(lens[:2])  # the job's own first two requests
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("transformers + accelerate (device_map=auto"))
    for x in res:
        assert f"{x['mode']} {x['tokens_per_s'] / acc['tokens_per_s']:.0f}x e2e" in line


def test_bench_baseline_gpu_kv_rows(tmp_path):
    """--baseline-gpu-kv-rows: the fair baseline may attend for some rows on the GPU too (a
    count, or 'auto': the planner's fit beside its resident layers, 0 without a GPU); without
    --baseline-resident, or with a bad value, it is a one-line error."""
    from specoffload import bench
    from specoffload.placement import planner
    from specoffload.sources.w4_shapes import llama_3_1_70b

    a = bench._options(["--workload", "w4", "--gen", "128", "--baseline-resident", "4", "--baseline-gpu-kv-rows", "auto"])
    assert bench._baseline_gpu_kv_rows(a, llama_3_1_70b(80), 4, cuda=False) == [0]
    [auto] = bench._baseline_gpu_kv_rows(a, llama_3_1_70b(80), 4, cuda=True)
    c = planner.Candidate("none", a.batch, k=a.k, slots=2, prefill_batch=a.prefill_batch, resident=4)
    wl = planner.Workload(a.prompt_len, a.gen, a.batch, a.agreement)
    assert auto == planner.gpu_kv_rows_fit(llama_3_1_70b(80), None, c, wl, 24 * 2**30) > 0
    a.baseline_gpu_kv_rows = "12"
    assert bench._baseline_gpu_kv_rows(a, llama_3_1_70b(80), 4, cuda=True) == [12]
    a.baseline_gpu_kv_rows = "0,auto,12"  # each in turn, the fastest for the ratios
    assert bench._baseline_gpu_kv_rows(a, llama_3_1_70b(80), 4, cuda=True) == [0, auto, 12]
    assert bench._baseline_gpu_kv_rows(a, llama_3_1_70b(80), 4, cuda=False) == [0, 12]  # auto is 0 off CUDA
    for bad in ("x", "-1", "0,,4"):
        a.baseline_gpu_kv_rows = bad
        with pytest.raises(ValueError, match="needs counts"):
            bench._baseline_gpu_kv_rows(a, None, 4, cuda=False)
    r = subprocess.run([sys.executable, "-m", "specoffload.cli", "bench", "--workload", "tiny",
                        "--baseline-gpu-kv-rows", "4"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, RAY_AUTH_MODE="disabled", HOME=str(tmp_path)))
    assert r.returncode == 2 and "--baseline-gpu-kv-rows needs --baseline-resident" in r.stderr
    assert "Traceback" not in r.stderr


def test_drain_summary_splits_passes_by_busy_rows():
    from specoffload.bench import drain_k

    r = {"batch": 8, "pass_log": [(3, 1.0, True, 8), (3, 1.2, True, 8), (5, 0.5, True, 6), (6, 0.4, True, 3),
                                  (8, 0.6, True, 2)]}
    assert drain_k(r) == {"full": (3.0, 1.1, 2), "drain": (7.0, 0.5, 2)}
    assert drain_k({"batch": 8, "pass_log": [(3, 1.0, True, 8)]}) is None  # no pass drained
    assert drain_k({"batch": 8, "pass_log": [(3, 1.0, True)]}) is None  # a log from before rows were kept


def test_an_engine_error_in_a_mode_is_one_line(monkeypatch, capsys):
    """A mode that fails inside the actors (on the H200: W3's prefill out of GPU memory at a
    hand-set --resident) ends the bench with one line and exit 2, not Ray's tracebacks."""
    from specoffload import bench
    from specoffload.errors import CapacityError

    def fail(argv):
        raise CapacityError("prefill ran out of GPU memory at layer 0 (sub-batch of 32 sequences)")

    monkeypatch.setattr(bench, "_main", fail)
    assert bench.main(["--workload", "tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["specoffload bench: error: prefill ran out of GPU memory at layer 0 (sub-batch of 32 sequences)"]


def test_bench_batch_max_is_the_planners_largest_batch(monkeypatch, capsys):
    """--batch max: what host memory holds beside every target layer (and the GPU cap, for the
    draft's KV), by the planner's account on this machine; measured here as the planner does."""
    from pathlib import Path

    from specoffload import bench
    from specoffload.placement import hardware
    from specoffload.placement.hardware import Hardware
    from specoffload.placement.planner import Workload, largest_batch

    h200 = Hardware.from_file(Path(bench.__file__).parent / "configs" / "hardware" / "h200_design.json")
    monkeypatch.setattr(hardware, "measure", lambda *a, **k: h200)
    a = bench._options(["--workload", "w1", "--batch", "max", "--draft-window", "64", "--draft-fp8", "--slots", "2"])
    tspec, dspec = bench.workload_shapes(a.workload, a.target_layers, a.draft_layers)
    got = bench._largest_batch(a, tspec, dspec, cuda=True)
    want, why = largest_batch(tspec, dspec, bench._candidate(a, dspec, 1), Workload(512, 128, 1, 0.8), h200)
    assert got == want > 0
    assert f"--batch max: {want} sequences of 512 + 128 tokens (one more: {why})" in capsys.readouterr().out


def test_bench_gpu_kv_rows_list(monkeypatch):
    """--gpu-kv-rows: a comma list of counts (each mode runs with each), 'auto' the planner's
    fit beside this run's placement (0 without a GPU); anything else is a one-line error."""
    from specoffload import bench
    from specoffload.placement import planner

    a = bench._options(["--workload", "w4", "--gen", "128", "--slots", "4", "--draft-window", "64",
                        "--gpu-kv-rows", "auto,0,12"])
    assert bench._gpu_kv_rows(a, None, None, cuda=False) == [0, 0, 12]
    from specoffload.sources.w4_shapes import llama_3_1_70b, llama_3_2_1b

    a.resident = 0
    auto = bench._gpu_kv_rows(a, llama_3_1_70b(80), llama_3_2_1b(16), cuda=True)[0]
    wl = planner.Workload(a.prompt_len, a.gen, a.batch, a.agreement)
    c = bench._candidate(a, llama_3_2_1b(16), a.batch)
    assert auto == planner.gpu_kv_rows_fit(llama_3_1_70b(80), llama_3_2_1b(16), c, wl, 24 * 2**30) > 0
    for bad in ("x", "-1", "3,"):
        a.gpu_kv_rows = bad
        with pytest.raises(bench.BenchError, match="--gpu-kv-rows"):
            bench._gpu_kv_rows(a, None, None, cuda=False)


def test_bench_stall_s_reaches_the_plan():
    """--stall-s sets plan.stall_s (a device call ends a stalled mode before its own limit);
    a negative one is a one-line error."""
    from specoffload import bench

    def plan(*argv):
        a = bench._options(["--workload", "tiny", *argv])
        a.gpu_kv_rows, a.resident = [0], 0  # what main resolves first (bench._gpu_kv_rows, _resident)
        return bench._plan(a, bench.SettingLists.parse(a), cuda=False)

    assert plan("--stall-s", "90").stall_s == 90 and plan().stall_s == 600
    with pytest.raises(bench.BenchError, match="stall_s must be >= 0"):
        plan("--stall-s", "-1")


def test_bench_worker_layer_runs_and_spread_resident_layers_reach_the_plan():
    """--no-worker-layer-runs sets plan.worker_layer_runs off (the plain path, to compare the
    two with two runs), --no-keep-freed-memory plan.keep_freed_memory; --resident N keeps
    placement.resident_layers' spread of N layers."""
    from specoffload import bench
    from specoffload.placement.resident_layers import resident_layers

    def plan(*argv, resident=0):
        a = bench._options(["--workload", "tiny", *argv])
        a.gpu_kv_rows, a.resident = [0], resident
        return bench._plan(a, bench.SettingLists.parse(a), cuda=False), a.target_layers

    assert plan()[0].worker_layer_runs and not plan("--no-worker-layer-runs")[0].worker_layer_runs
    # likewise the CPU worker's glibc setting (a process's life: two bench runs compare it)
    assert plan()[0].keep_freed_memory and not plan("--no-keep-freed-memory")[0].keep_freed_memory
    p, layers = plan(resident=1)
    assert layers > 1 and p.gpu_layers == resident_layers(layers, 1) != (0,)


def _row(mode: str, tokens_per_s: float, **over) -> dict:
    """A mode's row as Bench.run_mode leaves it, with the figures the table prints."""
    return {"mode": mode, "batch": 4, "tokens_per_s": tokens_per_s, "decode_tokens_per_s": tokens_per_s,
            "s_per_pass": 0.5, "stream_GBps": 1.0, "copy_GBps": 1.0, "acceptance": 0.5, "tokens_per_seq_pass": 2.0,
            "gpu_busy_decode": 0.5, **over}


def _bench_without_ray(monkeypatch, run_mode, events: list | None = None):
    """bench.main with Ray and its actors stubbed out: `run_mode` stands in for each timed mode,
    and `events`, if given, hears the actors start and stop."""
    from specoffload import bench, ray_env

    note = events.append if events is not None else (lambda what: None)
    monkeypatch.setattr(ray_env, "ensure_ray", lambda *a, **k: None)
    monkeypatch.setattr(ray_env, "check_cluster", lambda *a, **k: None)
    monkeypatch.setattr(bench.Bench, "start", lambda self, *a: note("start"))
    monkeypatch.setattr(bench.Bench, "warm_up", lambda self, modes: None)
    monkeypatch.setattr(bench.Bench, "stop", lambda self, timeout=None: note("stop"))
    monkeypatch.setattr(bench.Bench, "run_mode", run_mode)


@pytest.mark.parametrize("reusable", [True, False])
def test_a_failed_mode_does_not_cost_the_others(monkeypatch, capsys, tmp_path, reusable):
    """A mode that fails mid-run (session 30: W1-long's speculative mode ran out of GPU memory
    after 212 of 768 requests, which ended the device call before its baseline ran) is one line,
    and the rest still run: the modes after it on the same actors when the engine reported the
    error as its own (the executor recovers from it, as `LLM` does), else, its actors killed,
    the baseline on actors of its own. The table and the JSON hold what ran; exit status 2."""
    import json

    import ray
    from specoffload import bench
    from specoffload.errors import OutOfGpuMemoryMidRun

    ran, events = [], []

    def row(mode):
        return _row(mode, 10.0 if mode.startswith("none") else 30.0, decode_tokens_per_s=11.0, acceptance=None,
                    tokens_per_seq_pass=1.0)

    def run_mode(self, label, spec, s):
        ran.append(label)
        if label == "single@2":
            if reusable:
                raise OutOfGpuMemoryMidRun("a verification pass ran out of GPU memory at layer 1 (4 sequences, "
                                           "3 tokens each): lower batch_size")
            raise ray.exceptions.RayActorError()
        self.results.append(row(label))

    def baseline(self, resident, gpu_rows=(0,)):
        ran.append(f"none+r{resident}")
        self.results.append(row(f"none+r{resident}"))

    _bench_without_ray(monkeypatch, run_mode, events)
    monkeypatch.setattr(bench.Bench, "abandon", lambda self: events.append("abandon"))
    monkeypatch.setattr(bench.Bench, "baseline", baseline)
    out = tmp_path / "b.json"
    assert bench.main(["--workload", "tiny", "--modes", "none,single@2,single@3", "--baseline-resident", "1",
                       "--json", str(out)]) == 2
    std = capsys.readouterr()
    err = std.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("specoffload bench: error: single@2 failed: ")
    if reusable:
        assert ran == ["none", "single@2", "single@3", "none+r1"] and "abandon" not in events
        assert err[0].endswith("a verification pass ran out of GPU memory at layer 1 (4 sequences, 3 tokens each): "
                               "lower batch_size")
    else:  # its actors are killed; the baseline still runs on its own
        assert ran == ["none", "single@2", "none+r1"] and events.count("abandon") == 1
        assert "the modes left on these actors are skipped" in std.out
    table = [ln.split()[0] for ln in std.out.splitlines() if ln.startswith(("none", "single@"))]
    assert table == [r for r in ran if r != "single@2"]
    assert [r["mode"] for r in json.loads(out.read_text())["results"]] == table
    assert json.loads(out.read_text())["failed"] == [err[0].removeprefix("specoffload bench: error: ")]


def test_a_failed_baseline_keeps_the_table(monkeypatch, capsys):
    """The baseline failing mid-run still leaves the table of the modes that ran (it used to
    end the bench before the table), its one line the error, exit status 2."""
    from specoffload import bench
    from specoffload.errors import OutOfGpuMemoryMidRun

    def run_mode(self, label, spec, s):
        if label.startswith("none+r"):
            raise OutOfGpuMemoryMidRun("a verification pass ran out of GPU memory at layer 0 (4 sequences, 1 tokens each)")
        self.results.append(_row(label, 30.0, decode_tokens_per_s=31.0))

    _bench_without_ray(monkeypatch, run_mode)
    assert bench.main(["--workload", "tiny", "--modes", "single@2", "--baseline-resident", "1", "--no-warmup"]) == 2
    std = capsys.readouterr()
    assert std.err.strip() == ("specoffload bench: error: none+r1 failed: a verification pass ran out of GPU memory "
                               "at layer 0 (4 sequences, 1 tokens each)")
    assert [ln.split()[0] for ln in std.out.splitlines() if ln.startswith("single@")] == ["single@2"]


def test_the_baseline_runs_each_of_its_copy_piece_sizes_and_ratios_use_its_fastest(monkeypatch, capsys):
    """--baseline-copy-chunk-mib: plain decoding gets the copy piece sizes the modes' list gives
    them (session 31's w1-long call tried 8 and 64 MiB for speculation and 8 only for the
    baseline), each a row of its own; the ratios are against the fastest. Without
    --baseline-resident, or with a bad list, it is a one-line error."""
    from specoffload import bench

    ran = []

    def run_mode(self, label, spec, s):
        ran.append((label, s.copy_chunk_mib))
        tps = {"single@2": 300.0, 8: 100.0, 64: 120.0}[label if label.startswith("single") else s.copy_chunk_mib]
        self.results.append(_row(self.mode_name(label, spec, s), tps))

    _bench_without_ray(monkeypatch, run_mode)
    assert bench.main(["--workload", "tiny", "--modes", "single@2", "--copy-chunk-mib", "64", "--baseline-resident",
                       "1", "--baseline-copy-chunk-mib", "8,64", "--no-warmup"]) == 0
    assert ran == [("single@2", 64), ("none+r1", 8), ("none+r1", 64)]
    out = capsys.readouterr().out
    assert [ln.split()[0] for ln in out.splitlines() if ln.startswith(("single@", "none+r"))] == [
        "single@2/c64", "none+r1/c8", "none+r1/c64"]
    assert "against none+r1/c64 " in out and "single@2/c64 2.50x e2e" in out
    ran.clear()  # without the list the baseline takes the modes' first size, as before
    assert bench.main(["--workload", "tiny", "--modes", "single@2", "--copy-chunk-mib", "64,8", "--baseline-resident",
                       "1", "--no-warmup"]) == 0
    assert ran == [("single@2", 64), ("single@2", 8), ("none+r1", 64)]
    capsys.readouterr()
    for argv, msg in ((["--baseline-copy-chunk-mib", "8"], "--baseline-copy-chunk-mib needs --baseline-resident"),
                      (["--baseline-resident", "1", "--baseline-copy-chunk-mib", "8,0"],
                       "--baseline-copy-chunk-mib needs a comma list of sizes >= 1, got '8,0'")):
        assert bench.main(["--workload", "tiny", *argv]) == 2
        assert capsys.readouterr().err.strip() == f"specoffload bench: error: {msg}"


@pytest.mark.parametrize("flag, field, values, parsed, tags, bad, what", [
    # joining rows' prefill beside the pass's parts and in line with them
    ("--join-overlap", "join_overlap", "1,0", [True, False], ["/jo", "/jl"], "1,2", "a comma list of 0 and 1"),
    # the draft feeding itself its last proposal and not
    ("--draft-feed-last", "draft_feed_last", "1,0", [True, False], ["/fd", "/nf"], "yes", "a comma list of 0 and 1"),
    # joining rows' draft priming beside the pass and in line
    ("--draft-prime-beside", "draft_prime_beside", "1,0", [True, False], ["/pb", "/pi"], "on",
     "a comma list of 0 and 1"),
    # joins waiting for 16 and for 32 free rows; 0 is placement/refill.py's count
    ("--refill-rows", "refill_rows", "16,32,0", [16, 32, 0], ["/r16", "/r32", "/rauto"], "16,-1",
     "a comma list of integers >= 0"),
])
def test_a_speculative_list_flag_runs_each_mode_at_each_value(monkeypatch, capsys, flag, field, values, parsed, tags,
                                                               bad, what):
    """A list flag for what only speculation has (session 35-37's A/B runs on one set of
    actors): each speculative mode runs at each value, its row named by it, and the actors get
    that value; the plain baseline has no draft and runs once at the list's first. A bad list is
    a one-line error before anything starts."""
    from specoffload import bench

    ran = []

    def run_mode(self, label, spec, s):
        ran.append((label, getattr(s, field)))
        self.results.append(_row(self.mode_name(label, spec, s), 100.0 if label.startswith("none") else 300.0))

    _bench_without_ray(monkeypatch, run_mode)
    assert bench.main(["--workload", "tiny", "--modes", "single@2", flag, values, "--baseline-resident", "1",
                       "--no-warmup"]) == 0
    assert ran == [("single@2", v) for v in parsed] + [("none+r1", parsed[0])]
    out = capsys.readouterr().out
    assert [ln.split()[0] for ln in out.splitlines() if ln.startswith(("single@", "none+r"))] == [
        f"single@2{t}" for t in tags] + ["none+r1"]
    assert bench.main(["--workload", "tiny", flag, bad]) == 2
    assert capsys.readouterr().err.strip() == f"specoffload bench: error: {flag} needs {what}, got {bad!r}"


def test_the_baseline_runs_each_of_its_gpu_row_counts_and_ratios_use_its_fastest(monkeypatch, capsys):
    """--baseline-gpu-kv-rows 0,N: plain decoding tries each count of GPU rows the speculative
    modes' list may have (since cuDNN is off GPU rows are cheap, and may speed plain decoding
    too), each a row of its own on the baseline's actors; the ratios are against the fastest."""
    from specoffload import bench

    ran = []

    def run_mode(self, label, spec, s):
        ran.append((label, s.gpu_kv_rows))
        tps = {"single@2": 300.0, 0: 120.0, 2: 150.0}[label if label.startswith("single") else s.gpu_kv_rows]
        self.results.append(_row(self.mode_name(label, spec, s), tps, gpu_kv_rows=s.gpu_kv_rows))

    _bench_without_ray(monkeypatch, run_mode)
    assert bench.main(["--workload", "tiny", "--modes", "single@2", "--baseline-resident", "1",
                       "--baseline-gpu-kv-rows", "0,2", "--no-warmup"]) == 0
    assert ran == [("single@2", 0), ("none+r1", 0), ("none+r1g2", 2)]
    out = capsys.readouterr().out
    assert "against none+r1g2 (none keeping 1 target layers, 2 rows' KV on the GPU" in out
    assert "single@2 2.00x e2e" in out and "none+r1 0.80x e2e" in out


def test_run_settings_check_themselves_and_name_only_what_the_lists_vary():
    """One run's settings refuse values no run can have; a run's name tags a setting only where
    its list had more than one value, and the plain baseline never by the draft's settings."""
    from types import SimpleNamespace

    from specoffload.bench_settings import RunSettings, SettingLists

    a = SimpleNamespace(micro_batches="1,2", doorbell="1", copy_chunk_mib="64", baseline_copy_chunk_mib=None,
                        gpu_kv_rows=[0], join_overlap="1", draft_feed_last="1,0", refill_rows="0",
                        draft_prime_beside="1", mapped_out="0", early_posts="0", fused_prefill="0", kv_huge_pages="0",
                        baseline_switches="all")
    lists = SettingLists.parse(a)
    runs = lists.runs(resident=3)
    assert [(s.micro_batches, s.draft_feed_last) for s in runs] == [(1, True), (1, False), (2, True), (2, False)]
    assert all(s.resident == 3 and s.copy_chunk_mib == 64 and s.refill_rows == 0 for s in runs)
    assert [lists.suffix(s, baseline=False) for s in runs] == ["/fd", "/nf", "/fd", "/nf"]
    base = lists.baseline_runs(resident=2, gpu_rows=[0, 8])
    assert [(s.micro_batches, s.gpu_kv_rows, s.draft_feed_last) for s in base] == [
        (1, 0, True), (1, 8, True), (2, 0, True), (2, 8, True)]
    assert {lists.suffix(s, baseline=True) for s in base} == {""}
    assert lists.runs(resident=0, micro=4)[0].micro_batches == 4  # a mode's own /m4
    from specoffload.bench_settings import BenchError

    for text in ("10", "1,", "", "1,0,2"):  # each item of a switch list is one 0 or 1
        with pytest.raises(BenchError, match=f"--doorbell needs a comma list of 0 and 1, got {text!r}"):
            SettingLists.parse(SimpleNamespace(**{**vars(a), "doorbell": text}))
    for bad in (dict(micro_batches=0), dict(copy_chunk_mib=0), dict(gpu_kv_rows=-1), dict(refill_rows=-2),
                dict(resident=-1)):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be >= "):
            RunSettings(**{**vars(runs[0]), **bad})


@pytest.mark.parametrize("flag, field, on, off", [("--mapped-out", "mapped_out", "/mo", "/md"),
                                                  ("--early-posts", "early_posts", "/ep", "/op"),
                                                  ("--fused-prefill", "fused_prefill", "/fused", "/eager"),
                                                  ("--kv-huge-pages", "kv_huge_pages", "/hp", "/sp")])
def test_a_pass_list_flag_runs_every_mode_and_the_baseline_both_ways(monkeypatch, capsys, flag, field, on, off):
    """--mapped-out 1,0 (the attention output read by a GPU kernel or by a DMA) and
    --early-posts 1,0 (later parts' layers finished while weights copy) and --fused-prefill 1,0
    (the prefill's elementwise work fused) are not draft settings,
    so plain decoding runs both ways too (its fastest is the ratios' baseline), each a row of
    its own, or once at the list's first with --baseline-switches first; the actors get each
    run's value."""
    from specoffload import bench

    ran = []

    def run_mode(self, label, spec, s):
        ran.append((label, getattr(s, field)))
        tps = 300.0 if label.startswith("single") else (120.0 if getattr(s, field) else 100.0)
        self.results.append(_row(self.mode_name(label, spec, s), tps))

    _bench_without_ray(monkeypatch, run_mode)
    assert bench.main(["--workload", "tiny", "--modes", "single@2", flag, "1,0", "--baseline-resident",
                       "1", "--no-warmup"]) == 0
    assert ran == [("single@2", True), ("single@2", False), ("none+r1", True), ("none+r1", False)]
    out = capsys.readouterr().out
    assert [ln.split()[0] for ln in out.splitlines() if ln.startswith(("single@", "none+r"))] == [
        f"single@2{on}", f"single@2{off}", f"none+r1{on}", f"none+r1{off}"]
    assert f"against none+r1{on} " in out and f"single@2{on} 2.50x e2e" in out
    assert bench.main(["--workload", "tiny", flag, "2"]) == 2
    assert capsys.readouterr().err.strip() == f"specoffload bench: error: {flag} needs a comma list of 0 and 1, got '2'"
    # --baseline-switches first: the modes both ways, the baseline once, at the list's first
    ran.clear()
    assert bench.main(["--workload", "tiny", "--modes", "single@2", flag, "0,1", "--baseline-resident", "1",
                       "--baseline-switches", "first", "--no-warmup"]) == 0
    assert ran == [("single@2", False), ("single@2", True), ("none+r1", False)]
    out = capsys.readouterr().out
    assert f"against none+r1{off} " in out and f"single@2{on} 3.00x e2e" in out
    assert bench.main(["--workload", "tiny", "--baseline-switches", "first"]) == 2
    assert capsys.readouterr().err.strip() == "specoffload bench: error: --baseline-switches needs --baseline-resident"


def test_repeat_runs_the_modes_again_on_the_same_actors(monkeypatch, capsys):
    """--repeat 2 runs every mode's runs twice in turn on one set of actors, the second named
    #2 (W4's run first in its process was slower than the same run second); the baseline runs
    once; --repeat 0 is a one-line error."""
    from specoffload import bench

    ran, events = [], []

    def run_mode(self, label, spec, s):
        ran.append(self.mode_name(label, spec, s))
        first = self.repetition == 1 and not label.startswith("none")
        self.results.append(_row(ran[-1], 100.0 if label.startswith("none") else 300.0, host_busy=0.9 if first else 0.5,
                                 host_busy_processes=[{"pid": 7, "name": "kcompactd0", "cores": 1.5}] if first else [],
                                 worker_minor_faults=2_000_000 if first else 900, worker_anon_huge_gib=0.0,
                                 host_mem_available_gib=40.0 if first else 70.0,
                                 host_vm={"pgscan_kswapd": 5_000 if first else 0, "thp_fault_alloc": 0}))

    _bench_without_ray(monkeypatch, run_mode, events)
    assert bench.main(["--workload", "tiny", "--modes", "single@2,single@3", "--repeat", "2",
                       "--baseline-resident", "1", "--no-warmup"]) == 0
    assert ran == ["single@2", "single@3", "single@2#2", "single@3#2", "none+r1"]
    assert events == ["start", "stop", "start", "stop"]  # the modes' actors, then the baseline's
    out = capsys.readouterr().out
    assert "single@3#2 3.00x e2e" in out
    # per run: who kept the host busy, and how the worker's memory was backed
    assert "single@2 90%; kcompactd0 1.5, single@3 90%; kcompactd0 1.5, single@2#2 50%, single@3#2 50%" in out
    assert "single@2 2,000,000; 0.0" in out and "single@2#2 900; 0.0" in out
    # and whether the kernel reclaimed memory meanwhile (only counters that grew are named)
    assert "single@2 40.0; pgscan_kswapd 5,000, single@3 40.0; pgscan_kswapd 5,000, single@2#2 70.0, " in out
    assert bench.main(["--workload", "tiny", "--repeat", "0"]) == 2
    assert capsys.readouterr().err.strip() == "specoffload bench: error: --repeat needs a count of 1 or more, got 0"


def test_run_delta_counts_counters_and_keeps_snapshots():
    """bench's per-run stats: what grew during the run for counters, the value as the run left it
    for everything else. The CPU worker's huge pages are None until it has made a cache of 1 GiB
    or more, so a first large run goes from None to a number: subtracting that raised after W4's
    run had finished on the GPU machine (session 43) and lost the run."""
    from specoffload.bench import run_delta

    before = {"passes": 10, "cpu_attention_s": 1.5, "worker_anon_huge_at_start": None, "doorbell": True,
              "k_counts": {"4": 3}}
    after = {"passes": 25, "cpu_attention_s": 4.0, "worker_anon_huge_at_start": 3 << 30, "doorbell": True,
             "k_counts": {"4": 9}, "new_counter": 7}
    d = run_delta(before, after)
    assert d["passes"] == 15 and d["cpu_attention_s"] == 2.5
    assert d["worker_anon_huge_at_start"] == 3 << 30  # a snapshot: as the run left it
    assert d["doorbell"] is True and d["k_counts"] == {"4": 9} and d["new_counter"] == 7
    assert run_delta(after, {**after, "worker_anon_huge_at_start": None})["worker_anon_huge_at_start"] is None
