"""Scaled RoPE (linear, dynamic, yarn, longrope, llama3) against transformers' own generate,
generating past original_max_position_embeddings (32 here), with and without a draft."""

from __future__ import annotations

import pytest
import torch

from hf_reference import PROMPTS, hf_greedy
from tiny_models import ROPE_KINDS, make_tiny_with_tokenizer
from specoffload.configs.run_config import RunConfig
from specoffload.configs.sampling_params import SamplingParams
from specoffload.errors import CheckpointError
from specoffload.llm import LLM
from specoffload.models.checkpoint import Checkpoint
from specoffload.models.resident import ResidentModel
from specoffload.models.spec import load_spec
from specoffload.scheduler.generator import Generator
from specoffload.scheduler.reference_backend import ReferenceBackend
from specoffload.scheduler.request import Request

GEN = 32  # the 14-token prompt ends at position 45: past 32, where the scaled kinds change


@pytest.fixture(scope="module")
def rope_dir(tmp_path_factory):
    root, made = tmp_path_factory.mktemp("rope"), {}

    def get(kind: str):
        if kind not in made:
            made[kind] = make_tiny_with_tokenizer("llama", root / kind, 0, **ROPE_KINDS[kind])
        return made[kind]

    return get


def _run(d, draft, k=3, schedule="single"):
    tgt = ResidentModel.from_source(Checkpoint(d))
    dr = ResidentModel(tgt.spec.with_layers(1), tgt.glob, tgt.layers[:1]) if draft else None
    reqs = [Request(i, p, SamplingParams(max_tokens=GEN, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
    Generator(ReferenceBackend(tgt, dr), RunConfig(schedule=schedule if draft else "none", k=k, k_max=8,
                                                   batch_size=3)).run(reqs)
    return [r.out for r in reqs]


@pytest.mark.parametrize("kind", list(ROPE_KINDS))
def test_spec_reads_the_rope_kind(rope_dir, kind):
    spec = load_spec(rope_dir(kind))
    assert (spec.rope == "") == (kind == "default")
    assert spec.max_positions >= max(map(len, PROMPTS)) + GEN  # dynamic: 32 x factor 4


@pytest.mark.parametrize("kind", list(ROPE_KINDS))
def test_greedy_identical_past_the_original_context(rope_dir, kind):
    d = rope_dir(kind)
    want = hf_greedy(d, PROMPTS, GEN)
    assert _run(d, draft=False) == want
    assert _run(d, draft=True) == want  # self:1, verification blocks of 4 cross position 32


@pytest.mark.parametrize("kind", ["dynamic", "longrope"])
def test_long_prompt_uses_its_length(rope_dir, kind):
    # A prompt past the threshold: transformers rotates all of it with the prompt's length,
    # then each new token with its own position + 1.
    d = rope_dir(kind)
    prompt = [1] + [3 + (7 * i) % 90 for i in range(40)]
    want = hf_greedy(d, [prompt], 8)
    tgt = ResidentModel.from_source(Checkpoint(d))
    reqs = [Request(0, prompt, SamplingParams(max_tokens=8, ignore_eos=True))]
    Generator(ReferenceBackend(tgt, None), RunConfig(schedule="none", batch_size=1)).run(reqs)
    assert reqs[0].out == want[0]
    # and the prefill logits themselves, against a fresh transformers model's forward (a used
    # one keeps dynamic frequencies grown by its last, longer sequence: they depend on history)
    import transformers as tf

    cache = tgt.new_cache(1, 64)
    ours = tgt.forward(cache, torch.tensor(prompt), torch.tensor([len(prompt)]), which="all")
    with torch.no_grad():
        ref = tf.AutoModelForCausalLM.from_pretrained(str(d)).eval()(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["dynamic", "yarn"])
def test_through_actors_with_a_draft(ray_session, rope_dir, kind):
    d = rope_dir(kind)
    want = hf_greedy(d, PROMPTS, GEN)
    with LLM(str(d), draft="self:1", k=3, batch_size=2, progress=False) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(max_tokens=GEN, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == want


def test_unknown_rope_type_is_one_line(tmp_path):
    import json

    d = make_tiny_with_tokenizer("llama", tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "mrope", "rope_theta": 10000.0}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="rope"):
        load_spec(d)
