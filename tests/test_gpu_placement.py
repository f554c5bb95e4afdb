"""Placements that start: the executor loads within its GPU memory cap, and --plan auto falls
back to the planner's next candidate when its choice does not start."""

from __future__ import annotations

import gpu  # noqa: E402  (tests/ is on sys.path: conftest.py)
from specoffload.placement.planner import Candidate, Choice, Workload, plan
from specoffload.placement.plan import Plan

GiB = 2**30


def _cand(tps, gpu_bytes, **kw):
    return Candidate("single", 64, k=4, tokens_per_s=tps, gpu_bytes=gpu_bytes, **kw)


def test_fallbacks_are_the_fastest_that_need_less_gpu_memory():
    best = _cand(100, 20 * GiB)
    others = [_cand(99, 21 * GiB), _cand(98, 19 * GiB), _cand(97, 19.5 * GiB), _cand(96, 12 * GiB),
              _cand(95, 11 * GiB, fits=False), _cand(50, 8 * GiB), _cand(40, 4 * GiB)]
    ch = Choice(best, Plan(), (best, *others))
    # each fallback needs less than the one tried before it: a plan that ran out cannot be
    # helped by one that needs more; unfit candidates never
    assert [c.tokens_per_s for c in ch.fallbacks()] == [98, 96, 50]
    assert [c.tokens_per_s for c in ch.fallbacks(n=5)] == [98, 96, 50, 40]


def test_the_account_counts_the_cuda_context_and_the_draft_load(tiny_dir):
    """The planner's GPU bytes include the executor's CUDA context, and never fall below what
    loading the draft alone peaks at (its layers, one checkpoint layer staged, the context)."""
    from specoffload.models.spec import load_spec
    from specoffload.placement import cost_model as cmod
    from specoffload.placement.cost_model import CostModel
    from specoffload.placement.hardware import Hardware

    t, d = load_spec(tiny_dir("llama")), load_spec(tiny_dir("llama", seed=1))
    hw = Hardware(device="cuda", gpu_memory=8 * GiB, host_memory=64 * GiB, h2d_GBps=50, device_GBps=3000,
                  device_tflops=500, cpu_kv_GBps=40, cpu_attention_gflops=100, cpu_cores=16)
    wl = Workload(16, 8, 4)
    base = plan(t, d, hw, wl, cm=CostModel(cuda_context_bytes=0)).best
    more = plan(t, d, hw, wl, cm=CostModel(cuda_context_bytes=GiB)).best
    assert more.gpu_bytes - base.gpu_bytes == GiB
    cm = CostModel()
    floor = cm.cuda_context_bytes + cmod.model_bytes(d) + cmod.layer_bytes(d) + cm.workspace_bytes
    spec_cands = [c for c in plan(t, d, hw, wl, cm=cm).candidates if c.fits and c.schedule != "none"]
    assert spec_cands and min(c.gpu_bytes for c in spec_cands) >= floor


@gpu.cuda_only("a GPU memory cap needs a GPU")
def test_auto_plan_falls_back_when_its_choice_does_not_start(ray_session, tiny_dir, monkeypatch):
    """The planner's best keeps every layer resident under a cap that cannot hold them: the
    executor refuses in one line naming the figures, the run starts the next candidate (layers
    streamed) and its greedy output is transformers'."""
    import torch
    from hf_reference import PROMPTS, hf_greedy
    from specoffload.configs.sampling_params import SamplingParams
    from specoffload.llm import LLM
    from specoffload.placement import hardware, planner

    d = tiny_dir("llama", hidden_size=1024, intermediate_size=4096, num_hidden_layers=4)  # ~60 MB a layer in fp32
    with LLM(str(d), device="cuda", dtype="float32", progress=False) as llm:
        context = llm.info["gpu_context"]
    # Two slots (~120 MB), cuBLAS's 32 MiB workspace and a short prefill fit; four resident
    # layers (~240 MB) do not. The fused prefill (plan.fused_prefill, on for CUDA) compiles on
    # its first layer, and inductor's autotuning then briefly holds a buffer the size of the
    # GPU's L2 cache (50 MiB on an H100: the GPU check's OOM in session 44 asked for exactly
    # that); the planner's 1 GiB workspace covers it, this hand-set cap must too.
    cap = context + (200 << 20) + getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)
    hw = hardware.Hardware(device="cuda", gpu_memory=cap, host_memory=64 * GiB, h2d_GBps=50, device_GBps=3000,
                           device_tflops=500, cpu_kv_GBps=40, cpu_attention_gflops=100, cpu_cores=16)
    best = Candidate("none", 4, resident=4, slots=2, gpu_bytes=cap, tokens_per_s=2.0)
    nxt = Candidate("none", 4, resident=0, slots=2, gpu_bytes=cap // 2, tokens_per_s=1.0)
    monkeypatch.setattr(hardware, "measure", lambda *a, **k: hw)
    monkeypatch.setattr(planner, "plan", lambda *a, **k: Choice(best, planner.to_plan(best, llm.spec, hw),
                                                                (best, nxt), hw))
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    with LLM(str(d), device="cuda", dtype="float32", plan="auto", progress=False) as llm:
        assert len(llm.refused) == 1 and "out of memory loading the resident layers" in llm.refused[0]
        assert llm.plan.gpu_layers == () and llm.plan_choice.best is nxt
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(d, PROMPTS, 8)


@gpu.cuda_only("resident layers live in GPU memory")
def test_every_layer_resident_streams_nothing(ray_session, tiny_dir):
    """A plan that keeps every target layer on the GPU starts (no slots, nothing to stream)
    and decodes exactly, with a self-speculative draft too."""
    from hf_reference import PROMPTS, hf_greedy
    from specoffload.configs.sampling_params import SamplingParams
    from specoffload.llm import LLM

    d = tiny_dir("llama")
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    p = Plan(device="cuda", gpu_layers=(0, 1, 2))
    for draft in (None, "self:1"):
        with LLM(str(d), draft=draft, plan=p, dtype="float32", progress=False) as llm:
            assert llm.info["slots"] == 0 and llm.info["resident_layers"] == 3
            outs = llm.generate([{"prompt_token_ids": q} for q in PROMPTS], params)
        assert [o.outputs[0].token_ids for o in outs] == hf_greedy(d, PROMPTS, 8)


def test_a_draft_loads_only_where_a_plan_speculates(ray_session, tiny_dir):
    """--plan auto may choose plain decoding with a draft given: the executor then loads no
    draft (a 7B draft cost its whole load and 13.5 GiB of GPU memory on the GPU check), and the
    output is the target's."""
    from hf_reference import PROMPTS, hf_greedy
    from specoffload.configs.sampling_params import SamplingParams
    from specoffload.llm import LLM

    d = tiny_dir("llama")
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    for schedule, loaded in (("none", False), ("single", True)):
        with LLM(str(d), draft=str(d), schedule=schedule, k=2, dtype="float32", progress=False) as llm:
            assert llm.info["draft"] is loaded
            outs = llm.generate([{"prompt_token_ids": q} for q in PROMPTS], params)
        assert [o.outputs[0].token_ids for o in outs] == hf_greedy(d, PROMPTS, 6)
        ref = LLM(str(d), draft=str(d), schedule=schedule, k=2, dtype="float32", engine="reference", progress=False)
        assert (ref.backend.spec.draft is not None) is loaded  # the in-process engine alike
