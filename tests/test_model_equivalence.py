"""Our layer math against transformers' own model classes, per family."""

from __future__ import annotations

import pytest
import torch

from hf_reference import PROMPTS, hf_greedy, hf_model
from tiny_models import FAMILIES
from specoffload.configs.run_config import RunConfig
from specoffload.configs.sampling_params import SamplingParams
from specoffload.models.checkpoint import Checkpoint
from specoffload.models.resident import ResidentModel
from specoffload.scheduler.generator import Generator
from specoffload.scheduler.reference_backend import ReferenceBackend
from specoffload.scheduler.request import Request


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(tiny_dir, family):
    d = tiny_dir(family)
    model = ResidentModel.from_source(Checkpoint(d))
    cache = model.new_cache(len(PROMPTS), 64)
    toks = torch.tensor([t for p in PROMPTS for t in p])
    q_lens = torch.tensor([len(p) for p in PROMPTS])
    ours = model.forward(cache, toks, q_lens, which="all")
    ref = hf_model(str(d))
    off = 0
    for p in PROMPTS:  # prefill logits at every position, ragged batch packed together
        with torch.no_grad():
            want = ref(torch.tensor([p])).logits[0]
        torch.testing.assert_close(ours[off:off + len(p)], want, atol=2e-5, rtol=1e-4)
        off += len(p)
    nxt = torch.tensor([5, 6, 7, 8])  # one decode step on the cache
    ours = model.forward(cache, nxt, torch.ones(4, dtype=torch.long))
    for b, p in enumerate(PROMPTS):
        with torch.no_grad():
            want = ref(torch.tensor([p + [int(nxt[b])]])).logits[0, -1]
        torch.testing.assert_close(ours[b], want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_32_tokens_identical(tiny_dir, family):
    d = tiny_dir(family)
    want = hf_greedy(d, PROMPTS, 32)
    backend = ReferenceBackend(ResidentModel.from_source(Checkpoint(d)))
    reqs = [Request(i, p, SamplingParams(max_tokens=32, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
    Generator(backend, RunConfig(batch_size=3)).run(reqs)  # 2 batches: 3 + 1
    assert [r.out for r in reqs] == want


def test_sliding_window_is_exercised(tiny_dir):
    # The Mistral config has window 8 and the prompts run past it, so the test above checks it.
    spec = Checkpoint(tiny_dir("mistral")).spec
    assert spec.sliding_windows[0] == 8 and max(len(p) for p in PROMPTS) + 32 > 8
