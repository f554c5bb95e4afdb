"""Qwen3-MoE and Qwen2-MoE against transformers' own generate: the reference engine and the Ray
actors, with a dense same-tokenizer draft (a tiny Qwen3) and self-speculative."""

from __future__ import annotations

import pytest

from hf_reference import PROMPTS, hf_greedy
from specoffload.configs.run_config import RunConfig
from specoffload.configs.sampling_params import SamplingParams
from specoffload.llm import LLM
from specoffload.models.checkpoint import Checkpoint
from specoffload.models.resident import ResidentModel
from specoffload.models.spec import load_spec
from specoffload.scheduler.generator import Generator
from specoffload.scheduler.reference_backend import ReferenceBackend
from specoffload.scheduler.request import Request

GEN = 20


def test_specs(tiny_dir):
    q3 = load_spec(tiny_dir("qwen3_moe"))
    assert (q3.num_experts, q3.experts_per_token, q3.expert_size, q3.norm_topk_prob) == (16, 4, 24, False)
    assert q3.dense_layers == (1,) and q3.qk_norm and not q3.shared_expert_size
    assert [q3.layer_is_moe(j) for j in range(3)] == [True, False, True]
    q2 = load_spec(tiny_dir("qwen2_moe"))
    assert q2.dense_layers == (0, 2) and q2.shared_expert_size == 48 and q2.qkv_bias and q2.norm_topk_prob
    # the layer sizes the planner streams: dense and MoE layers differ
    assert q2.layer_param_count(0) < q2.layer_param_count(1) == q2.layer_param_count()


def test_qwen3_moe_renormalised_top_k_matches(tiny_dir):
    d = tiny_dir("qwen3_moe", norm_topk_prob=True)
    want = hf_greedy(d, PROMPTS, GEN)
    backend = ReferenceBackend(ResidentModel.from_source(Checkpoint(d)))
    reqs = [Request(i, p, SamplingParams(max_tokens=GEN, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
    Generator(backend, RunConfig(batch_size=4)).run(reqs)
    assert [r.out for r in reqs] == want


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
@pytest.mark.parametrize("draft", ["self", "qwen3"])
def test_speculative_reference(tiny_dir, family, draft):
    d = tiny_dir(family)
    want = hf_greedy(d, PROMPTS, GEN)
    tgt = ResidentModel.from_source(Checkpoint(d))
    if draft == "self":  # 2 layers: a routed and a dense one in both tiny configs
        dr = ResidentModel(tgt.spec.with_layers(2), tgt.glob, tgt.layers[:2])
    else:
        dr = ResidentModel.from_source(Checkpoint(tiny_dir("qwen3", seed=3, num_hidden_layers=1)))
    reqs = [Request(i, p, SamplingParams(max_tokens=GEN, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
    Generator(ReferenceBackend(tgt, dr), RunConfig(schedule="single", k=3, k_max=8, batch_size=2)).run(reqs)
    assert [r.out for r in reqs] == want


@pytest.mark.parametrize("family,draft", [("qwen3_moe", "qwen3"), ("qwen2_moe", "self:2"), ("qwen3_moe", None)])
def test_through_actors(ray_session, tiny_dir, family, draft):
    d = tiny_dir(family)
    if draft == "qwen3":
        draft = str(tiny_dir("qwen3", seed=3, num_hidden_layers=1))
    want = hf_greedy(d, PROMPTS, GEN)
    with LLM(str(d), draft=draft, k=3, batch_size=2, progress=False, micro_batches=2) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(max_tokens=GEN, ignore_eos=True))
        if draft:
            assert llm.last_stats["acceptance"] is not None
    assert [o.outputs[0].token_ids for o in outs] == want
