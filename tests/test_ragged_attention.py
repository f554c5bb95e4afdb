"""Rows of different lengths attend in ranges of similar ones (`ragged_chunks`): the same
result as one call padded to the longest row, and as attention computed row by row."""

from __future__ import annotations

import pytest
import torch

from hf_reference import PROMPTS, hf_greedy
from specoffload.models import attention
from specoffload.models.attention import KVCache, ragged_chunks


def test_chunks_cover_every_row_with_the_keys_it_needs():
    lens = [130, 140, 1200, 1210, 1190, 300, 128, 900]
    for call_keys in (0, 64, 512, 10**9):
        chunks = ragged_chunks(lens, call_keys)
        assert chunks[0][0] == 0 and chunks[-1][1] == len(lens)
        assert all(a < b for a, b, _ in chunks)
        assert all(b == a2 for (_, b, _), (a2, _, _) in zip(chunks, chunks[1:]))  # contiguous
        for a, b, n in chunks:
            assert n == max(lens[a:b])  # no row reads keys no row of its range holds
    assert ragged_chunks(lens, 10**9) == [(0, 8, 1210)]  # calls costlier than any padding: one call
    assert len(ragged_chunks(lens, 0)) == len(lens)  # free calls: no two different lengths share one
    assert ragged_chunks([5, 5, 5], 0) == [(0, 3, 5)]  # equal rows pad nothing
    # W1-long's case: a short row between long ones pays its own call, equal rows share one
    assert ragged_chunks([1000, 1000, 150, 1000, 1000], 512) == [(0, 2, 1000), (2, 3, 150), (3, 5, 1000)]
    assert ragged_chunks([640] * 192, 512) == [(0, 192, 640)]
    assert ragged_chunks([], 512) == []


def _row_by_row(q, K, V, lens, q_lens, G, window=None):
    """Attention of each row's queries over exactly its own keys, in float64 (the reference)."""
    out, t = [], 0
    for b in range(len(lens)):
        for i in range(int(q_lens[b])):
            pos = int(lens[b]) + i
            lo = 0 if window is None else max(0, pos - window + 1)
            for h in range(q.shape[1]):
                kk, vv = K[b, h // G, lo: pos + 1].double(), V[b, h // G, lo: pos + 1].double()
                w = torch.softmax(kk @ q[t, h].double() / q.shape[-1] ** 0.5, 0)
                out.append(w @ vv)
            t += 1
    return torch.stack(out).view(t, -1)


@pytest.mark.parametrize("ragged_q", [False, True])
@pytest.mark.parametrize("window", [None, 40])
def test_chunked_equals_padded_and_row_by_row(ragged_q, window, monkeypatch):
    g = torch.Generator().manual_seed(7)
    B, Hq, Hkv, d, cap = 6, 8, 2, 16, 400
    before = torch.tensor([10, 300, 12, 290, 5, 150])
    q_lens = torch.tensor([3, 1, 2, 3, 1, 2]) if ragged_q else torch.full((B,), 3)
    T = int(q_lens.sum())
    q, k, v = (torch.randn(T, h, d, generator=g) for h in (Hq, Hkv, Hkv))
    got = {}
    for ragged in (False, True):
        c = KVCache(1, B, Hkv, d, cap, torch.float32, windows=(window,), ragged=ragged)
        for t in c.k + c.v:
            t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(1)))
        c.lens = before.clone()
        monkeypatch.setattr(attention, "RAGGED_CALL_KEYS", 32)
        c.begin_pass(q_lens, T)
        assert (c._chunks is not None and len(c._chunks) > 2) == ragged  # the chunked path really runs
        got[ragged] = c.attend_layer(0, q, k, v)
        full_k, full_v = c.k[0], c.v[0]
    torch.testing.assert_close(got[True], got[False], rtol=1e-5, atol=1e-6)
    want = _row_by_row(q, full_k, full_v, before, q_lens, Hq // Hkv, window).float()
    torch.testing.assert_close(got[True], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 8])
def test_query_rows_split_equals_one_call(ragged, rows, monkeypatch):
    """KVCache(max_rows=) (default CPU_QUERY_ROWS): each K/V head's G x (k+1) query rows attend in calls of at most `rows`
    (so torch's CPU kernel does not repack K/V), in the fewest calls of near-equal size; the output is the one call's and the exact
    row-by-row attention's, padded or in ragged ranges."""
    import types

    g = torch.Generator().manual_seed(3)
    B, Hq, Hkv, d, cap = 6, 8, 2, 16, 400
    before = torch.tensor([10, 300, 12, 290, 5, 150])
    q_lens = torch.full((B,), 3)  # G 4 x 3 queries: 12 rows per K/V head
    T = int(q_lens.sum())
    q, k, v = (torch.randn(T, h, d, generator=g) for h in (Hq, Hkv, Hkv))
    seen = []
    real = attention.F.scaled_dot_product_attention
    monkeypatch.setattr(attention, "F", types.SimpleNamespace(
        scaled_dot_product_attention=lambda q, *a, **kw: seen.append(q.shape[2]) or real(q, *a, **kw)))
    monkeypatch.setattr(attention, "RAGGED_CALL_KEYS", 32)
    got = {}
    monkeypatch.setattr(attention, "CPU_QUERY_ROWS", rows)  # the default where a cache sets none
    for limit in (0, None, rows):  # 0: no limit
        c = KVCache(1, B, Hkv, d, cap, torch.float32, ragged=ragged, max_rows=limit)
        for t in c.k + c.v:
            t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(1)))
        c.lens = before.clone()
        c.begin_pass(q_lens, T)
        seen.clear()
        got[limit] = c.attend_layer(0, q, k, v)
        # the split really ran, in the fewest calls of near-equal size (5 -> 4 + 4 + 4)
        assert max(seen) == (12 if limit == 0 else -(-12 // -(-12 // rows)))
        assert len(seen) == (1 if limit == 0 else -(-12 // rows)) * (len(c._chunks) if ragged else 1) == c.calls
        if ragged:  # a micro-batch's view keeps its cache's limit
            assert c.part(0, 3).max_rows == limit
    torch.testing.assert_close(got[rows], got[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[None], got[rows], rtol=0, atol=0)
    want = _row_by_row(q, c.k[0], c.v[0], before, q_lens, Hq // Hkv, None).float()
    torch.testing.assert_close(got[rows], want, rtol=1e-4, atol=1e-5)


def test_a_cache_moved_to_another_device_keeps_one_call():
    assert not KVCache(1, 2, 1, 4, 8, torch.float32).ragged  # off unless asked (RAGGED_ROWS)
    c = KVCache(1, 2, 1, 4, 8, torch.float32, ragged=True)
    assert c.ragged and not KVCache(1, 2, 1, 4, 8, torch.float32, device="meta", ragged=True).ragged
    assert not c.to("meta").ragged and c.to("cpu").ragged


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_greedy_output_with_a_call_per_row_equals_transformers(tiny_dir, family, monkeypatch):
    """Prompts of different lengths, each row attending on its own (a call costs nothing):
    speculative output still equals transformers' greedy generate, token for token."""
    from specoffload.configs.run_config import RunConfig
    from specoffload.configs.sampling_params import SamplingParams
    from specoffload.models.checkpoint import Checkpoint
    from specoffload.models.resident import ResidentModel
    from specoffload.scheduler.generator import Generator
    from specoffload.scheduler.reference_backend import ReferenceBackend
    from specoffload.scheduler.request import Request

    calls = []
    real = attention.ragged_chunks
    monkeypatch.setattr(attention, "RAGGED_ROWS", True)
    monkeypatch.setattr(attention, "RAGGED_CALL_KEYS", 0)
    monkeypatch.setattr(attention, "ragged_chunks", lambda n, c=None: calls.append(real(n, c)) or calls[-1])
    d = tiny_dir(family)
    assert len({len(p) for p in PROMPTS}) > 1  # the rows really differ in length
    want = hf_greedy(d, PROMPTS, 16)
    tgt = ResidentModel.from_source(Checkpoint(d))
    draft = ResidentModel(tgt.spec.with_layers(1), tgt.glob, tgt.layers[:1])
    reqs = [Request(i, p, SamplingParams(max_tokens=16, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
    Generator(ReferenceBackend(tgt, draft), RunConfig(schedule="single", k=3, batch_size=len(PROMPTS))).run(reqs)
    assert [r.out for r in reqs] == want
    assert any(len(c) > 1 for c in calls)  # rows did attend in separate calls


def test_ragged_attention_through_the_actors(ray_session, tiny_dir):
    """plan.ragged_attention reaches the CPU worker's caches: with a call costing nothing
    every row of a different length attends on its own, and output equals transformers'."""
    from specoffload.configs.sampling_params import SamplingParams
    from specoffload.errors import ConfigError
    from specoffload.llm import LLM
    from specoffload.placement.plan import Plan

    with pytest.raises(ConfigError, match="ragged_attention must be >= 0"):
        Plan(ragged_attention=-1)
    d = tiny_dir("llama")
    want = hf_greedy(d, PROMPTS, 12)
    with LLM(str(d), plan=Plan(device="cpu", ragged_attention=0), batch_size=4, progress=False) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(max_tokens=12, ignore_eos=True))
        stats = llm.last_stats
    assert [o.outputs[0].token_ids for o in outs] == want
    assert stats["attention_sdpa_calls"] > stats["attention_layer_calls"] > 0  # ranges really ran


def test_query_rows_through_the_actors(ray_session, tiny_dir):
    """plan.cpu_query_rows reaches the CPU worker's caches: with one query row per call (every
    decoding block split row by row, as the SDPA call count shows) output still equals
    transformers'."""
    from specoffload.configs.sampling_params import SamplingParams
    from specoffload.errors import ConfigError
    from specoffload.llm import LLM
    from specoffload.placement.plan import Plan

    with pytest.raises(ConfigError, match="cpu_query_rows must be >= 0"):
        Plan(cpu_query_rows=-1)
    d = tiny_dir("llama")
    want = hf_greedy(d, PROMPTS, 12)
    with LLM(str(d), plan=Plan(device="cpu", cpu_query_rows=1), batch_size=4, k=3, progress=False) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(max_tokens=12, ignore_eos=True))
        stats = llm.last_stats
    assert [o.outputs[0].token_ids for o in outs] == want
    assert stats["cpu_query_rows"] == 1
    # the worker's caches split each block (no draft: G 2 x 1 query = 2 rows a head), one row a call
    assert stats["attention_sdpa_calls"] == 2 * stats["attention_layer_calls"] > 0
