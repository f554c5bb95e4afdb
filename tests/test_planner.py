"""The planner: memory it must respect, choices it must be able to make, and its files."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from specoffload.cli import main as cli_main
from specoffload.errors import CapacityError, ConfigError
from specoffload.placement import cost_model as cm
from specoffload.placement.hardware import Hardware, attention_rates, measure
from specoffload.placement.plan import Plan
from specoffload.placement.planner import Workload, plan
from specoffload.scheduler.schedule import expected_tokens
from specoffload.sources.constructed import mistral_7b, mixtral_8x7b

H200 = Path(__file__).resolve().parents[1] / "configs" / "hardware" / "h200_design.json"
W1 = Workload(512, 128, 192, 0.8)


@pytest.fixture(scope="module")
def h200():
    return Hardware.from_file(H200)


def _best(choice, **match):
    ok = [c for c in choice.candidates if c.fits and all(getattr(c, k) == v for k, v in match.items())]
    return max(ok, key=lambda c: c.tokens_per_s) if ok else None


def test_shipped_hardware_files_load():
    files = sorted(H200.parent.glob("*.json"))
    assert len(files) >= 2
    for f in files:
        hw = Hardware.from_file(f)
        assert hw.device == "cuda" and hw.measured


def test_hardware_file_checks_itself(tmp_path, h200):
    assert Hardware.from_dict(h200.to_dict()) == h200
    assert h200.gpu_memory == 24 * 2**30
    with pytest.raises(ConfigError, match="h2d_GBps must be a positive number"):
        replace(h200, h2d_GBps=0)
    with pytest.raises(ConfigError, match="unknown hardware field"):
        Hardware.from_dict({**h200.to_dict(), "pcie": 4})
    with pytest.raises(ConfigError, match="lacks: cpu_kv_GBps"):
        Hardware.from_dict({k: v for k, v in h200.to_dict().items() if k != "cpu_kv_GBps"})
    bad = tmp_path / "hw.json"
    bad.write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Hardware.from_file(bad)


def test_measure_on_this_cpu():
    hw = measure("cpu", quick=True)
    assert hw.device == "cpu" and hw.cpu_cores >= 1 and "measure on" in hw.measured
    assert hw.host_memory > 2**28 and hw.gpu_memory <= hw.host_memory + 2**30


def test_measure_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="torch sees no GPU"):
        measure("cuda")


def test_rounds_follow_the_acceptance_process():
    # one sequence: the mean rounds over many trials is what the mean tokens per round gives
    # (renewal process: ~ tokens / E + a fraction), and the slowest of many needs more
    a, k, n = 0.8, 8, 127
    one = np.mean([cm.rounds_needed.__wrapped__(a, k, 1, n, trials=1, seed=s) for s in range(400)])
    assert abs(one - n / expected_tokens(a, k)) < 1.5
    many = cm.rounds_needed(a, k, 192, n)
    assert many > one + 4
    assert cm.rounds_needed(a, 0, 192, n) == n and cm.rounds_needed(0.0, 8, 192, n) == n


def test_w1_memory_matches_what_ran(h200):
    """Run 11 fit (fp8 ring of 128 beside the draft and two slots at batch 192); runs 12 and 13 (a
    bf16 ring of 128) ran out of memory under 24 GiB; the planner must agree with both."""
    ch = plan(mixtral_8x7b(), mistral_7b(), h200, W1, draft_fp8=False)
    fp8 = [c for c in ch.candidates if c.batch == 192 and c.window == 128 and c.fp8 and c.schedule == "single"]
    bf16 = [c for c in ch.candidates if c.batch == 192 and c.window == 128 and not c.fp8 and c.schedule == "single"]
    assert fp8 and all(c.fits for c in fp8)
    assert bf16 and not any(c.fits for c in bf16) and "GPU needs" in bf16[0].why
    full = [c for c in ch.candidates if c.batch == 192 and c.window is None and c.draft_kv == "gpu"
            and c.schedule == "single"]
    assert not any(c.fits for c in full)
    assert all(c.gpu_bytes <= h200.gpu_memory and c.host_bytes <= h200.host_memory
               for c in ch.candidates if c.fits)


def test_w1_prediction_is_near_run_11(h200):
    """Run 11 (docs/benchmarks.md): single@auto, W128 fp8, 1.943 s per round, 39 rounds, 86.0 s.
    The cost model's constants were fitted to W1's traces, so this checks the model's structure
    (the rounds simulation, the copy bound, drafting per round) rather than predicting anew."""
    ch = plan(mixtral_8x7b(), mistral_7b(), h200, W1, draft_fp8=False)
    c = _best(ch, schedule="single", batch=192, window=128, fp8=True)
    assert abs(c.pass_s + c.draft_s - 1.943) < 0.15
    assert 36 <= c.rounds <= 43
    assert abs(c.seconds - 86.0) / 86.0 < 0.1


def test_speculation_only_when_it_pays(h200):
    spec = plan(mixtral_8x7b(), mistral_7b(), h200, W1)
    assert spec.best.schedule == "single" and spec.run_options()["adaptive_k"]
    assert spec.best.tokens_per_s > 2 * _best(spec, schedule="none").tokens_per_s
    poor = plan(mixtral_8x7b(), mistral_7b(), h200, replace(W1, acceptance=0.05))
    assert poor.best.schedule == "none" and poor.plan.draft_window is None
    alone = plan(mixtral_8x7b(), None, h200, W1)
    assert {c.schedule for c in alone.candidates} == {"none"}


def test_each_schedule_wins_somewhere(h200):
    """DESIGN.md: the planner models single and dual and chooses by machine. Where drafting is
    slow (a GPU whose memory reads at 100 GB/s), verifying one batch while the other drafts
    hides it, and dual wins by a clear margin. (Slow CPU attention alone no longer makes dual
    win: a single batch in two micro-batches overlaps its GPU work with the worker's attention
    too; cost_model.layer_chain_s.) In waves: refilled in place, a single batch of half the rows
    has no tail to hide and wins (test_refill_priced). At acceptance 0.9: at 0.8 plain decoding
    with this machine's spare memory as GPU rows (priced for it since session 34) wins, 177 tok/s
    predicted against dual's 159, as it should where a slow draft earns that little."""
    slow_draft = replace(h200, cpu_kv_GBps=12.0, cpu_attention_gflops=1000.0, device_tflops=300.0, device_GBps=100.0,
                         host_memory="400GB").with_gpu_memory("16GiB")
    wl = Workload(512, 128, 384, 0.9, refill=False)
    dual = plan(mixtral_8x7b(), mistral_7b(), slow_draft, wl)
    assert dual.best.schedule == "dual" and dual.best.micro_batches == 1
    assert dual.best.tokens_per_s > 1.2 * _best(dual, schedule="single").tokens_per_s
    assert plan(mixtral_8x7b(), mistral_7b(), replace(slow_draft, cpu_kv_GBps=49.0, cpu_attention_gflops=1040.0,
                                                      device_tflops=650.0, device_GBps=4000.0).with_gpu_memory("40GiB"),
                wl).best.schedule == "single"


def test_gpu_rows_take_slow_attention_off_the_cpu(h200, monkeypatch):
    """Priced (PRICE_GPU_ROWS, off until the GPU shows them faster), spare GPU memory holds the
    first rows' target KV (plan.gpu_kv_rows) where CPU attention bounds the layer chain: the
    CPU attends for fewer rows, the pass shortens, and the GPU account counts the rows' KV at
    the generator's capacity."""
    from specoffload.placement import planner
    from specoffload.placement.planner import _gpu_bytes

    monkeypatch.setattr(planner, "PRICE_GPU_ROWS", True)

    slow_cpu = replace(h200, cpu_kv_GBps=3.0, cpu_attention_gflops=100.0, device_tflops=100.0, device_GBps=1000.0,
                       host_memory="400GB").with_gpu_memory("24GiB")
    wl = Workload(512, 128, 384, 0.8, refill=False)
    ch = plan(mixtral_8x7b(), mistral_7b(), slow_cpu, wl)
    b = ch.best
    assert b.schedule == "single" and 0 < b.gpu_kv_rows <= b.batch and ch.plan.gpu_kv_rows == b.gpu_kv_rows
    assert b.gpu_bytes <= slow_cpu.gpu_memory
    without = _gpu_bytes(mixtral_8x7b(), mistral_7b(), 0, replace(b, gpu_kv_rows=0), wl, cm.CostModel())
    assert b.gpu_bytes == _gpu_bytes(mixtral_8x7b(), mistral_7b(), 0, b, wl, cm.CostModel())
    assert b.gpu_bytes - without == b.gpu_kv_rows * cm.gpu_row_bytes(mixtral_8x7b(), 512 + 128 + 16 + 2)
    k1 = b.k + 1
    assert cm.layer_chain_s(slow_cpu, cm.CostModel(), mixtral_8x7b(), b.batch, k1, 576, b.gpu_kv_rows) < \
        0.8 * cm.layer_chain_s(slow_cpu, cm.CostModel(), mixtral_8x7b(), b.batch, k1, 576)
    # a CPU fast enough that the copy bounds every layer: no rows, the memory goes to layers or slots
    fast = plan(mixtral_8x7b(), mistral_7b(), replace(h200, cpu_kv_GBps=400.0, cpu_attention_gflops=20000.0), W1)
    assert fast.best.gpu_kv_rows == 0


def test_plain_decoding_gets_gpu_rows_where_attention_bounds_its_chain():
    """Plain decoding's memory short of a whole resident layer holds GPU rows where CPU attention
    bounds its layers: w1-long's baseline with the 36 rows `bench --baseline-gpu-kv-rows auto`
    fitted beside 5 resident layers took 0.199 s a pass against 0.232 without (docs/benchmarks.md,
    W1-long "Session 34"). The planner must find that placement, price it faster, and fit it;
    where the copy bounds every layer (a far faster CPU) it keeps none."""
    from specoffload.placement.planner import gpu_kv_rows_fit

    traced = Hardware.from_file(H200.parent / "h200_traced.json").with_gpu_memory("24GiB")
    t, d, wl = mixtral_8x7b().with_layers(8), mistral_7b().with_layers(8), Workload(1024, 256, 768, 0.8)
    none = _best(plan(t, d, traced, wl), schedule="none", batch=192)
    assert none.resident == 5 and none.gpu_kv_rows > 0 and none.gpu_bytes <= traced.gpu_memory
    assert none.gpu_kv_rows == gpu_kv_rows_fit(t, None, replace(none, gpu_kv_rows=0), wl, traced.gpu_memory)
    without = cm.target_pass_s(traced, cm.CostModel(), t, 192, 1, 1024 + 128, 5, 0, 0, none.micro_batches)
    assert none.pass_s < 0.95 * without
    fast = replace(traced, cpu_kv_GBps=4000.0, cpu_attention_gflops=200000.0)
    assert _best(plan(t, d, fast, wl), schedule="none", batch=192).gpu_kv_rows == 0


def test_gpu_rows_fit_leaves_slack_beside_a_draft():
    """gpu_kv_rows_fit (`bench --gpu-kv-rows auto`) fills the GPU left beside a placement with
    rows; beside a draft it leaves CostModel.draft_rows_slack_bytes free (W1-long's 107 rows,
    filled to 23.99 GiB of 24, ran out of memory mid-pass: session 30), plain decoding's rows
    none; a placement the slack leaves no room for gets 0 rows, not a negative count."""
    from specoffload.placement.draft_kv import DraftKV
    from specoffload.placement.planner import Candidate, _gpu_bytes, _row_bytes, gpu_kv_rows_fit

    wl, ring = Workload(1024, 256, 192, 0.8), DraftKV("gpu", 64, 4, False)
    t, d, cap = mixtral_8x7b().with_layers(8), mistral_7b().with_layers(8), 24 * 2**30
    model = cm.CostModel()
    for draft, sched, slack in ((d, "single", model.draft_rows_slack_bytes), (None, "none", 0)):
        c = Candidate(sched, 192, k=4, kv=ring, slots=2, prefill_batch=16, resident=3, draft_fp8=True)
        rows = gpu_kv_rows_fit(t, draft, c, wl, cap)
        need = _gpu_bytes(t, draft, 0, c, wl, model) + slack
        assert 0 < rows < 192
        assert need + rows * _row_bytes(t, wl) <= cap < need + (rows + 1) * _row_bytes(t, wl)
    c = Candidate("single", 192, k=4, kv=ring, slots=2, prefill_batch=16, resident=3, draft_fp8=True)
    tight = _gpu_bytes(t, d, 0, c, wl, model) + model.draft_rows_slack_bytes // 2
    assert gpu_kv_rows_fit(t, d, c, wl, tight) == 0


def test_window_acceptance_steers_the_window(h200):
    free = plan(mixtral_8x7b(), mistral_7b(), h200, W1, draft_fp8=False).best
    assert free.window == 64  # the cheapest ring, when told no window costs acceptance
    costly = plan(mixtral_8x7b(), mistral_7b(), h200, replace(W1, window_acceptance=((64, 0.6),)),
                  draft_fp8=False).best
    assert costly.window == 128 and costly.fp8  # the largest window that fits at batch 192


def test_w1_fp8_draft_memory_goes_to_slots_that_hide_drafting(h200):
    """Run 16 (docs/benchmarks.md): the fp8 draft's 6.5 GiB held two more slots, which fill with
    the next pass's layers while the draft runs: 1.780 s per round against run 11's 1.943, 80.1
    and 81.2 s in runs 16 and 17. Resident layers would save little (W1's CPU attention nearly
    fills a copy), so the planner must spend the memory on slots, and only with a draft."""
    ch = plan(mixtral_8x7b(), mistral_7b(), h200, W1)
    b = ch.best
    assert b.schedule == "single" and b.draft_fp8 and b.slots == 4 and b.resident == 0
    assert ch.plan.draft_fp8 and ch.plan.num_slots == 4
    assert abs(b.seconds - 80.6) / 80.6 < 0.1
    run16 = _best(ch, schedule="single", batch=192, window=64, fp8=False, draft_fp8=True)
    assert run16.slots == 4 and abs(run16.pass_s + cm.exposed_draft_s(cm.CostModel(), run16.draft_s, 4, cm.layer_copy_s(
        h200, mixtral_8x7b())) - 1.780) < 0.15
    bf16 = plan(mixtral_8x7b(), mistral_7b(), h200, W1, draft_fp8=False).best
    assert not bf16.draft_fp8 and bf16.slots == 2 and bf16.seconds > b.seconds  # no room for more
    none = _best(ch, schedule="none")
    assert none.slots == 2 and none.resident > 0  # no drafting to hide: spare memory holds layers
    with pytest.raises(ConfigError, match="separate draft"):
        plan(mixtral_8x7b(), None, h200, W1, self_layers=4, draft_fp8=True)
    cpu = replace(h200, device="cpu")  # fp8 matmuls are emulated on a CPU: never chosen there
    assert not any(c.draft_fp8 for c in plan(mixtral_8x7b(), mistral_7b(), cpu, W1).candidates)


def test_memory_decides_resident_and_disk_layers(h200):
    big_gpu = plan(mixtral_8x7b(), None, h200.with_gpu_memory("120GiB"), W1)
    assert big_gpu.best.resident > 20 and big_gpu.plan.gpu_layers == tuple(range(big_gpu.best.resident))
    small_host = plan(mixtral_8x7b(), None, replace(h200, host_memory="80GB"), W1)
    d = small_host.best.disk
    assert d > 0 and small_host.plan.disk_layers == tuple(range(32 - d, 32))
    assert small_host.best.pass_s > plan(mixtral_8x7b(), None, h200, W1).best.pass_s  # disk is slower
    with pytest.raises(CapacityError, match="no placement fits"):
        plan(mixtral_8x7b(), mistral_7b(), h200.with_gpu_memory("4GiB"), W1)


def test_self_draft_layers_stay_resident(h200):
    ch = plan(mixtral_8x7b(), None, h200, W1, self_layers=4)
    assert ch.best.schedule == "single" and ch.best.resident >= 4  # 4 shared layers cost no draft weights
    assert set(range(4)) <= set(ch.plan.gpu_layers)
    assert all(c.resident >= 4 for c in ch.candidates if c.schedule != "none" and c.fits)


def test_workload_checks_itself():
    with pytest.raises(ConfigError, match="acceptance"):
        Workload(16, 16, 4, 1.0)
    with pytest.raises(ConfigError, match=">= 1"):
        Workload(0, 16, 4)
    assert Workload(16, 16, 4, 0.5, ((128, 0.4),)).acceptance_for(128) == 0.4
    assert Workload(16, 16, 4, 0.5, ((128, 0.4),)).acceptance_for(64) == 0.5


def test_plan_cli_writes_a_plan_generate_reads(tmp_path, capsys):
    out, js = tmp_path / "plan.json", tmp_path / "choice.json"
    rc = cli_main(["plan", "--shapes", "w1", "--hardware", str(H200), "--acceptance", "0.8", "--out", str(out),
                   "--json", str(js), "--window-acceptance", "64=0.6", "--draft-fp8", "off"])
    text = capsys.readouterr().out
    assert rc == 0 and "chosen: single" in text and "generate --plan" in text
    p = Plan.from_file(out)
    assert p.device == "cuda" and p.batch_size == 192 and p.draft_window == 128 and p.draft_kv_fp8
    assert not p.draft_fp8 and p.num_slots == 2
    assert json.loads(js.read_text())["run"]["schedule"] == "single"
    # An fp8 draft leaves room for a bf16 ring of 128 and one more slot (two, before the account
    # counted the executor's CUDA context).
    assert cli_main(["plan", "--shapes", "w1", "--hardware", str(H200), "--acceptance", "0.8", "--out", str(out),
                     "--window-acceptance", "64=0.6"]) == 0
    p = Plan.from_file(out)
    assert p.draft_fp8 and p.num_slots == 3 and p.draft_window == 128 and not p.draft_kv_fp8
    assert "fp8 draft" in capsys.readouterr().out


@pytest.mark.parametrize("argv,msg", [
    (["--hardware", "/nonexistent.json"], "hardware file not found"),
    (["--window-acceptance", "64:0.6"], "cannot read '64:0.6'"),
    (["--acceptance", "1.5"], "acceptance must be in"),
    (["--gpu-memory", "4GiB"], "no placement fits"),
    (["--out", "/nonexistent-dir/plan.json"], "cannot write --out /nonexistent-dir/plan.json"),
])
def test_plan_cli_errors_are_one_line(argv, msg, capsys):
    args = ["plan", "--shapes", "w1", "--hardware", str(H200)]
    if argv[0] == "--hardware":
        args = ["plan", "--shapes", "w1"]
    rc = cli_main(args + argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and msg in err[0]


@pytest.mark.parametrize("acceptance,speculative", [(0.05, False), (0.9, True)])
def test_llm_plan_auto_runs_what_it_chose_and_stays_exact(tiny_dir, acceptance, speculative):
    """LLM(plan="auto") measures this machine, plans for the workload, and generates with the
    chosen plan and schedule; greedy output stays the target's own (transformers' generate)."""
    from hf_reference import PROMPTS, hf_greedy

    from specoffload.configs.sampling_params import SamplingParams
    from specoffload.llm import LLM

    d = tiny_dir("llama")
    wl = Workload(max(map(len, PROMPTS)), 12, len(PROMPTS), acceptance)
    llm = LLM(str(d), draft="self:1", plan="auto", workload=wl, engine="reference", progress=False)
    chosen = llm.plan_choice.best.schedule
    assert (chosen != "none") == speculative
    assert llm.run_cfg.schedule == chosen and llm.plan == llm.plan_choice.plan
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(max_tokens=12, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(d, PROMPTS, 12)


def test_refill_priced(h200):
    """With more requests than rows, the planner prices refill in place against waves, and picks
    it where rows would otherwise wait for a wave's slowest one; a join rides the next pass, so
    it waits for few free rows."""
    wl = Workload(512, 128, 768, 0.8)
    on = plan(mixtral_8x7b(), mistral_7b(), h200, wl).best
    off = plan(mixtral_8x7b(), mistral_7b(), h200, replace(wl, refill=False)).best
    assert on.refill and 1 <= on.refill_rows <= on.batch // 4
    assert on.tokens_per_s > off.tokens_per_s and not off.refill
    assert plan(mixtral_8x7b(), mistral_7b(), h200, W1).run_options()["refill"] is False  # one wave


def test_fp8_target_halves_the_stream_and_frees_host_memory(h200):
    """An fp8 target (issue 19): half the bytes per layer for the slots and the copy, a
    shorter predicted pass, no layers on disk where bf16 needed some, and room for more sequences."""
    bf16, fp8 = mixtral_8x7b(), replace(mixtral_8x7b(), weights="fp8")
    assert 0.49 < fp8.layer_bytes() / bf16.layer_bytes() < 0.51
    assert cm.target_pass_s(h200, cm.CostModel(), fp8, 192, 1, 640) < 0.55 * cm.target_pass_s(
        h200, cm.CostModel(), bf16, 192, 1, 640)
    small = replace(h200, host_memory="80GB")
    assert plan(bf16, None, small, W1).best.disk > 0 and plan(fp8, None, small, W1).best.disk == 0
    big = Workload(512, 128, 4096, 0.8)
    # the largest batch whose KV fits beside every layer in host memory (none on disk)
    batch = lambda spec: max(c.batch for c in plan(spec, None, h200, big).candidates  # noqa: E731
                             if c.fits and c.disk == 0)
    assert batch(fp8) >= 2 * batch(bf16)


def test_w4_prefill_memory_counts_the_dense_ffn():
    """W4 (Llama-3.1-70B in fp8, Llama-3.2-1B draft, W64 ring, 4 slots, prefill sub-batches of
    16 prompts of 512) ran out of GPU memory at its first prefill layer on the H200 with 13
    layers resident under 24 GiB, the count the account gave when it left out the dense FFN's
    gate/up activations (session 16). The account must now keep fewer resident; the MoE W1
    account, which runs 11 to 16 fitted, is unchanged in what it places."""
    from specoffload.placement.draft_kv import DraftKV
    from specoffload.placement.planner import Candidate, spare_layers
    from specoffload.sources.w4_shapes import llama_3_1_70b, llama_3_2_1b

    target = replace(llama_3_1_70b(), weights="fp8")
    c = Candidate("single", 192, k=4, kv=DraftKV("gpu", 64, 4, False), draft_fp8=False, slots=4, prefill_batch=16)
    wl = Workload(512, 64, 192, 0.8)
    assert spare_layers(target, llama_3_2_1b(), c, wl, 24 * 2**30) < 13
    # the dense FFN's share is one sub-batch's: 16 x 512 tokens x 3 x 28672 in bf16
    ffn = cm.prefill_gpu_bytes(target, 192, 16, 512) - cm.prefill_gpu_bytes(replace(target, intermediate_size=0), 192, 16, 512)
    assert ffn == 16 * 512 * 3 * 28672 * 2
    # a MoE target's prefill is its kept hidden states: W1's 192 prompts of 512, ~0.8 GiB
    assert cm.prefill_gpu_bytes(mixtral_8x7b(), 192, 16, 512) == 192 * 512 * (4096 + 2 * 128) * 2


def test_copy_pieces_are_small_where_the_chain_bounds_a_layer():
    """The copy engine runs host-to-device copies in the order queued, so an attention output
    waits behind the weight pieces ahead of it. The planner asks for small pieces where its
    own figures put a layer's chain above its copy (W4: CPU attention over 64 query heads),
    and keeps the large ones where the copy bounds it (W1 plain decoding in bf16)."""
    from specoffload.placement.planner import SMALL_COPY_CHUNK_MIB, copy_chunk_mib
    from specoffload.placement.plan import Plan
    from specoffload.sources.w4_shapes import llama_3_1_70b, llama_3_2_1b

    traced = Hardware.from_file(H200.parent / "h200_traced.json")
    w4 = plan(replace(llama_3_1_70b(), weights="fp8"), llama_3_2_1b(), traced, Workload(512, 128, 192, 0.8))
    assert w4.plan.copy_chunk_mib == SMALL_COPY_CHUNK_MIB < Plan.copy_chunk_mib
    w1 = plan(mixtral_8x7b(), None, traced, W1)
    assert w1.best.schedule == "none" and w1.plan.copy_chunk_mib == Plan.copy_chunk_mib
    # the rule itself: chain against copy at the candidate's queries and mean context
    chain = cm.layer_chain_s(traced, cm.CostModel(), mixtral_8x7b(), 192, 1, 512 + 64)
    assert chain < cm.layer_copy_s(traced, mixtral_8x7b())
    assert copy_chunk_mib(mixtral_8x7b(), w1.best, traced, W1, cm.CostModel()) == Plan.copy_chunk_mib


def test_largest_batch_is_what_host_memory_holds_beside_every_layer(h200):
    """`bench --batch max` (issue 19: the largest fp8 batch host memory allows). Without a
    draft the host KV bounds it: the batch fits with no layer on disk and one more does not,
    and an fp8 target (half the weights' bytes) holds more. A draft's KV ring on the GPU can
    bound it first; a machine where nothing fits says so."""
    from specoffload.placement.draft_kv import DraftKV
    from specoffload.placement.planner import Candidate, _place, largest_batch

    bf16, fp8 = mixtral_8x7b(), replace(mixtral_8x7b(), weights="fp8")
    small = replace(h200, host_memory="120GB")
    wl = Workload(512, 128, 1, 0.8)
    got = {}
    for spec in (bf16, fp8):
        b, why = largest_batch(spec, None, Candidate("none", 1), wl, small)
        at = lambda n: _place(spec, None, 0, Candidate("none", n), small, replace(wl, requests=n), cm.CostModel())  # noqa: E731
        assert at(b).fits and at(b).disk == 0 and (not at(b + 1).fits or at(b + 1).disk > 0)
        assert "host" in why or "disk" in why
        got[spec.weights] = b
    assert got["fp8"] > got[bf16.weights] > 0
    ring = Candidate("single", 1, k=4, kv=DraftKV("gpu", None, 0, False), slots=4)
    b_ring, why = largest_batch(fp8, mistral_7b(), ring, wl, replace(h200, gpu_memory="24GiB"))
    assert b_ring < got["fp8"] and "GPU" in why
    with pytest.raises(CapacityError, match="not even one sequence"):
        largest_batch(bf16, None, Candidate("none", 1), wl, replace(h200, host_memory="20GB"))


def test_attention_rates_fit_the_read_and_the_arithmetic():
    # 2 ms of reading + 0.5 ms per query: the line gives back both rates
    queries = [1, 4, 8, 16]
    kv, gflops = attention_rates(queries, [0.002 + 0.0005 * q for q in queries], kv_bytes=4e9 * 0.002,
                                 flops_per_query=300e9 * 0.0005, matmul_gflops=5000)
    assert kv == pytest.approx(4.0) and gflops == pytest.approx(300.0)
    # Noise that makes more queries time faster is not free arithmetic: the CPU's matmul rate
    # bounds it (the two-point fit this replaced gave 1.08e9 GFLOP/s on a busy GPU machine).
    times = [0.0030, 0.0031, 0.0029, 0.0028]
    kv, gflops = attention_rates(queries, times, kv_bytes=4e9 * 0.003, flops_per_query=300e9 * 0.0005,
                                 matmul_gflops=5000)
    slope, read = np.polyfit(queries, times, 1)
    assert slope < 0 and gflops == 5000 and kv == pytest.approx(4e9 * 0.003 / read / 1e9)


def test_two_micro_batches_where_the_chain_bounds_a_layer():
    """W4 (a 70B fp8 target, 192 rows): the worker's attention outlasts the weight copy, and in
    two micro-batches the executor's hand-off for one part runs beside the worker's attention
    for the other, so the planner runs two (W4's best measured figure ran so: 227.9 tok/s at k 4,
    session 31). Where the copy bounds every layer, a batch under MICRO_BATCH_MIN_ROWS, and
    the dual schedule: one part."""
    from specoffload.placement.planner import MICRO_BATCH_MIN_ROWS
    from specoffload.sources.w4_shapes import llama_3_1_70b, llama_3_2_1b

    traced = Hardware.from_file(H200.parent / "h200_traced.json")
    target, draft = replace(llama_3_1_70b(), weights="fp8"), llama_3_2_1b()
    ch = plan(target, draft, traced, Workload(512, 128, 192, 0.8))
    b = ch.best
    assert b.schedule == "single" and b.micro_batches == ch.plan.micro_batches == 2 and "2 parts" in b.label()
    one, two = (cm.target_pass_s(traced, cm.CostModel(), target, 192, b.k + 1, 576, b.resident, 0, b.gpu_kv_rows, m)
                for m in (1, 2))
    assert two < 0.9 * one and b.pass_s == pytest.approx(two)
    assert all(c.micro_batches == 1 for c in ch.candidates if c.schedule == "dual" or c.batch < MICRO_BATCH_MIN_ROWS)
    assert plan(target, draft, traced, Workload(512, 128, 32, 0.8)).plan.micro_batches == 1
    # the copy bounds every layer (a CPU far faster than the copy): nothing to overlap
    fast = replace(traced, cpu_kv_GBps=4000.0, cpu_attention_gflops=200000.0)
    assert plan(target, draft, fast, Workload(512, 128, 192, 0.8)).plan.micro_batches == 1


def test_gpu_rows_where_cpu_attention_bounds_the_chain():
    """W4 (a 70B fp8 target at 192 rows): CPU attention bounds its layers, so the planner gives
    the spare GPU memory to GPU KV rows rather than resident layers (W4's measured best: 0
    resident, 48 GPU rows, session 32), and fewer CPU rows shorten its pass. W1 (Mixtral, the
    copy bounds each layer) gains nothing from them and plans none."""
    from specoffload.sources.w4_shapes import llama_3_1_70b, llama_3_2_1b

    traced = Hardware.from_file(H200.parent / "h200_traced.json")
    target, draft = replace(llama_3_1_70b(), weights="fp8"), llama_3_2_1b()
    b = plan(target, draft, traced, Workload(512, 128, 192, 0.8)).best
    assert b.gpu_kv_rows > 0 and b.resident == 0
    with_rows, without = (cm.target_pass_s(traced, cm.CostModel(), target, 192, b.k + 1, 576, 0, 0, g, b.micro_batches)
                          for g in (b.gpu_kv_rows, 0))
    assert with_rows < without
    w1 = plan(mixtral_8x7b(), mistral_7b(), traced, Workload(512, 128, 192, 0.8)).best
    assert w1.gpu_kv_rows == 0
