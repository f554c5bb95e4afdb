"""plan.host_embedding: the target's embedding table stays in host memory, a pass gathering its
tokens' rows there, and the GPU memory it frees goes to KV rows by the planner's account."""

from __future__ import annotations

from dataclasses import replace

import pytest

import gpu  # noqa: E402  (tests/ is on sys.path: conftest.py)

GiB = 2**30


def test_the_account_gives_the_table_to_gpu_rows():
    """W4's shapes (Llama-3.1-70B in fp8, untied): the table's 1.96 GiB leaves the GPU account,
    and gpu_kv_rows_fit turns it into rows of 205.6 MiB; the tied draft-sized model's table is
    its head and stays."""
    from specoffload.placement import cost_model as cmod
    from specoffload.placement.draft_kv import DraftKV
    from specoffload.placement.planner import Candidate, Workload, _gpu_bytes, _row_bytes, gpu_kv_rows_fit
    from specoffload.sources.w4_shapes import llama_3_1_70b, llama_3_2_1b

    t, d = replace(llama_3_1_70b(), weights="fp8"), llama_3_2_1b()
    table = t.vocab_size * t.hidden_size * 2
    assert cmod.glob_bytes(t) - cmod.gpu_glob_bytes(t, True) == table and cmod.gpu_glob_bytes(t, False) == \
        cmod.glob_bytes(t)
    assert cmod.gpu_glob_bytes(d, True) == cmod.glob_bytes(d)  # tied: the head
    wl = Workload(512, 128, 192, 0.8)
    c = Candidate("single", 192, k=4, kv=DraftKV("gpu", 64, 4), slots=4, prefill_batch=8)
    on = replace(c, host_embedding=True)
    assert _gpu_bytes(t, d, 0, c, wl, cmod.CostModel()) - _gpu_bytes(t, d, 0, on, wl, cmod.CostModel()) == table
    rows = {h: gpu_kv_rows_fit(t, d, replace(c, host_embedding=h), wl, 24 * GiB) for h in (False, True)}
    # the freed table holds 9 more rows (give or take one at the boundary of the cap)
    assert table // _row_bytes(t, wl) == 9 and rows[True] - rows[False] in (9, 10)


def test_plans_carry_it():
    from specoffload.placement.hardware import Hardware
    from specoffload.placement.plan import Plan
    from specoffload.placement.planner import Candidate, to_plan
    from specoffload.sources.w4_shapes import llama_3_1_70b

    p = Plan(device="cuda", host_embedding=True)
    assert Plan.from_msgpack(p.to_msgpack()).host_embedding is True and Plan().host_embedding is False
    assert Plan.from_dict({"device": "cuda", "host_embedding": True}) == p  # a plan file's keys
    hw = Hardware(device="cuda", gpu_memory=24 * GiB, host_memory=128 * GiB, h2d_GBps=50, device_GBps=3000,
                  device_tflops=500, cpu_kv_GBps=40, cpu_attention_gflops=100, cpu_cores=16)
    assert to_plan(Candidate("none", 8, host_embedding=True), llama_3_1_70b(), hw).host_embedding is True


@pytest.mark.parametrize("device", ["cpu", gpu.CUDA])
def test_a_host_table_generates_as_transformers(ray_session, tiny_dir, device):
    """Speculative decoding with rows joining a running batch (prefill in a pass and verification
    both embed) equals transformers' greedy output with the table left in host memory. On the
    GPU the executor's table is the host copy and its globals' GPU memory is the head and norm
    only (the CPU is one device: there only the path runs)."""
    import ray
    from hf_reference import PROMPTS, hf_greedy
    from specoffload.actors.supervisor import actors
    from specoffload.configs.sampling_params import SamplingParams
    from specoffload.llm import LLM
    from specoffload.placement.plan import Plan

    d = tiny_dir("llama")
    lengths = [3, 9, 6, 6]  # row 0 ends first: request 2 joins the running batch
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in lengths]
    want = [w[:n] for w, n in zip(hf_greedy(d, PROMPTS, max(lengths)), lengths)]
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    with LLM(str(d), plan=Plan(device=device, host_embedding=True), draft=str(d), schedule="single", k=2,
             batch_size=2, refill=True, dtype="float32", progress=False) as llm:
        outs = llm.generate(prompts, params)
        assert llm.plan.host_embedding and llm.last_stats["joins"] >= 1
        ex = actors(llm.run_id)["gpu_executor"]
        where = ray.get(ex.__ray_call__.remote(lambda self: self.glob["embed"].device.type), timeout=60)
        parts = ray.get(ex.memory.remote(), timeout=60).get("parts") if device == "cuda" else None
    assert [o.outputs[0].token_ids for o in outs] == want
    assert where == "cpu"
    if parts is not None:
        from specoffload.models.spec import load_spec

        s = load_spec(d)
        table = s.vocab_size * s.hidden_size * 4  # float32
        # the head and the norm only: one table's bytes and a little, not two tables'
        assert table <= parts["globals"] < 1.5 * table
