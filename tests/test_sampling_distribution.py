"""Sampled speculative decoding follows the target's distribution (chi-square tests)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from hf_reference import hf_model
from specoffload.configs.run_config import RunConfig
from specoffload.configs.sampling_params import SamplingParams
from specoffload.models.checkpoint import Checkpoint
from specoffload.models.resident import ResidentModel
from specoffload.scheduler.generator import Generator
from specoffload.scheduler.reference_backend import ReferenceBackend
from specoffload.scheduler.request import Request
from specoffload.speculation.sampler import probs_from_logits, sample
from specoffload.speculation.verify import verify_sampled


def _chi2(samples: np.ndarray, p: np.ndarray, min_expected: float = 5.0) -> float:
    """p-value of samples against distribution p, pooling rare outcomes into one bin."""
    p = np.asarray(p, dtype=np.float64)
    p = p / p.sum()
    n = len(samples)
    counts = np.bincount(samples, minlength=len(p)).astype(float)
    big = p * n >= min_expected
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(p[big] * n, p[~big].sum() * n)
    keep = exp > 0
    assert obs[~keep].sum() == 0, "a token with zero target probability was emitted"
    return float(chisquare(obs[keep], exp[keep]).pvalue)


def test_rejection_rule_emits_target_distribution():
    g = torch.Generator().manual_seed(0)
    V, k, N = 12, 3, 100_000
    p = torch.softmax(torch.randn(1, k + 1, V, generator=g) * 1.5, -1).expand(N, -1, -1)
    q = torch.softmax(torch.randn(1, k, V, generator=g) * 1.5, -1).expand(N, -1, -1)  # disagrees often
    d = sample(q, torch.rand(N, k, generator=g))
    tokens, counts = verify_sampled(p, d, q, torch.rand(N, k, generator=g), torch.rand(N, generator=g))
    assert (counts >= 1).all() and (counts <= k + 1).all()
    assert (counts == 1).any() and (counts == k + 1).any()  # rejections and whole accepted blocks
    # The first emitted token is distributed as p_0 whatever the draft did.
    assert _chi2(tokens[:, 0].numpy(), p[0, 0].numpy()) > 1e-3
    # Given the first token was an accepted draft d1 = x, the second follows p_1.
    x = int(torch.mode(d[:, 0]).values)
    sel = (counts >= 2) & (d[:, 0] == x)
    assert int(sel.sum()) > 2000
    assert _chi2(tokens[sel, 1].numpy(), p[0, 1].numpy()) > 1e-3


def test_top_k_top_p_restrict_support():
    logits = torch.tensor([[[3.0, 2.0, 1.0, 0.0, -1.0]]])
    one = lambda x: torch.tensor([x])  # noqa: E731
    p = probs_from_logits(logits, one(1.0), one(2), one(1.0))[0, 0]
    assert (p[2:] == 0).all() and torch.isclose(p.sum(), torch.tensor(1.0))
    p = probs_from_logits(logits, one(1.0), one(-1), one(0.5))[0, 0]
    assert p[0] == 1.0  # the top token alone holds >= 0.5 of the mass
    p = probs_from_logits(logits, one(0.0), one(-1), one(1.0))[0, 0]
    assert p.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]  # temperature 0 is greedy


@pytest.mark.parametrize("temperature,top_k,top_p,draft_kv", [
    (1.0, -1, 1.0, "gpu"), (0.8, 20, 0.9, "gpu"), (0.8, 20, 0.9, "recompute"), (1.0, -1, 1.0, "host")])
def test_speculative_sampling_matches_target_end_to_end(tiny_dir, temperature, top_k, top_p, draft_kv):
    """Many seeds, one prompt: the first speculated token (the second emitted) follows the
    target's own distribution, with a draft that often disagrees (its KV kept on the device,
    kept on the host and visiting in chunks of 1000 sequences, or rebuilt each round in such
    chunks)."""
    d = tiny_dir("llama")
    other = tiny_dir("llama", seed=1, num_hidden_layers=1, intermediate_size=48)
    tgt = ResidentModel.from_source(Checkpoint(d))
    draft = ResidentModel.from_source(Checkpoint(other))
    prompt = [1, 5, 7, 9]
    N = 3000
    reqs = [Request(i, prompt, SamplingParams(max_tokens=2, temperature=temperature, top_k=top_k, top_p=top_p,
                                              seed=1000 + i, ignore_eos=True)) for i in range(N)]
    backend = ReferenceBackend(tgt, draft, draft_kv=draft_kv)
    backend.spec.prefill_chunk = 1000
    stats = Generator(backend, RunConfig(schedule="single", k=3, batch_size=N)).run(reqs)
    assert 0 < stats.accepted < stats.proposed  # the draft is right sometimes and wrong sometimes
    first = np.array([r.out[0] for r in reqs])
    second = np.array([r.out[1] for r in reqs])
    m = hf_model(str(d))
    one = lambda x, dt=torch.float32: torch.tensor([x], dtype=dt)  # noqa: E731
    proc = lambda lg: probs_from_logits(lg[None, None], one(temperature), one(top_k, torch.long), one(top_p))[0, 0]  # noqa: E731
    with torch.no_grad():
        p0 = proc(m(torch.tensor([prompt])).logits[0, -1]).numpy()
    assert _chi2(first, p0) > 1e-3
    t1 = int(np.bincount(first).argmax())
    with torch.no_grad():
        p1 = proc(m(torch.tensor([prompt + [t1]])).logits[0, -1]).numpy()
    sel = first == t1
    assert sel.sum() > 300
    assert _chi2(second[sel], p1) > 1e-3


def test_seeded_requests_are_reproducible(tiny_dir):
    d = tiny_dir("llama")
    tgt = ResidentModel.from_source(Checkpoint(d))

    def run(batch_size):
        reqs = [Request(i, [1, 5, 7], SamplingParams(max_tokens=12, temperature=1.0, seed=7 + i, ignore_eos=True))
                for i in range(4)]
        Generator(ReferenceBackend(tgt, tgt), RunConfig(schedule="single", k=3, batch_size=batch_size)).run(reqs)
        return [r.out for r in reqs]

    assert run(4) == run(1)  # same seeds, different batching: same tokens
