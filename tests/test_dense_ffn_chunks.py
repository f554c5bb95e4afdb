"""A dense FFN over many tokens (a prefill sub-batch) runs in chunks of rows: the same rows
as one call, in bf16 and fp8 layers alike, and greedy output still equals transformers'."""

from __future__ import annotations

import pytest
import torch

from hf_reference import PROMPTS, hf_greedy
from specoffload.models import layers
from specoffload.models.fp8_weights import quantize_layer


def _case(dtype):
    g = torch.Generator().manual_seed(3)
    H, I, T = 16, 40, 50
    w = {n: (torch.randn(shape, generator=g) * 0.2).to(dtype)
         for n, shape in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I)))}
    x = torch.randn(T, H, generator=g).to(dtype)
    return w, x


class _Spec:
    hidden_act = "silu"


@pytest.mark.parametrize("fp8", [False, True])
def test_chunked_rows_equal_one_call(fp8, monkeypatch):
    w, x = _case(torch.float32)
    if fp8:
        w = quantize_layer(w)  # gate/up stacked, every matrix fp8 with per-row scales
        assert "gate_up" in w
    want = layers._dense_ffn(_Spec, w, x)
    for name in ("DENSE_CHUNK_BYTES", "DENSE_CHUNK_MAX_BYTES"):
        monkeypatch.setattr(layers, name, 7 * 40 * x.element_size())  # 7 rows a chunk
    calls = []
    real = layers._dense_ffn
    monkeypatch.setattr(layers, "_dense_ffn", lambda s, w, x, *more: calls.append(x.shape[0]) or real(s, w, x, *more))
    got = layers.dense_ffn(_Spec, w, x)
    assert calls == [7] * 7 + [1]
    # Not to the bit: a CPU matmul of a few rows may round differently from one of all of them.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_greedy_output_with_chunked_ffn_equals_transformers(tiny_dir, monkeypatch):
    from specoffload.configs.run_config import RunConfig
    from specoffload.configs.sampling_params import SamplingParams
    from specoffload.models.checkpoint import Checkpoint
    from specoffload.models.resident import ResidentModel
    from specoffload.scheduler.generator import Generator
    from specoffload.scheduler.reference_backend import ReferenceBackend
    from specoffload.scheduler.request import Request

    d = tiny_dir("llama")
    want = hf_greedy(d, PROMPTS, 16)
    tgt = ResidentModel.from_source(Checkpoint(d))
    for name in ("DENSE_CHUNK_BYTES", "DENSE_CHUNK_MAX_BYTES"):
        monkeypatch.setattr(layers, name, 5 * tgt.spec.intermediate_size * 4)  # 5 tokens a chunk
    draft = ResidentModel(tgt.spec.with_layers(1), tgt.glob, tgt.layers[:1])
    reqs = [Request(i, p, SamplingParams(max_tokens=16, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
    Generator(ReferenceBackend(tgt, draft), RunConfig(schedule="single", k=3, batch_size=len(PROMPTS))).run(reqs)
    assert [r.out for r in reqs] == want


def test_chunks_grow_within_the_prefill_account():
    """Chunks are at least 64 MiB of intermediate, and larger (up to 256 MiB) while a chunk's
    ~4.5x peak stays within the 3x of the whole intermediate that the planner's prefill account
    counts."""
    MiB, I, b = 1 << 20, 28672, 2  # Llama-3.1-70B's FFN width, bf16
    row = I * b
    assert layers.dense_chunk_rows(8192, I, b) == 256 * MiB // row  # W4's sub-batch of 16 x 512
    assert layers.dense_chunk_rows(1000, I, b) >= 1000  # 55 MiB in all: one call
    assert layers.dense_chunk_rows(3 * 64 * MiB // row, I, b) == 2 * 64 * MiB // row  # 2/3 of 192 MiB
    for tokens in (1, 100, 1500, 2000, 3000, 5000, 8192, 20000):
        step = layers.dense_chunk_rows(tokens, I, b)
        chunk = min(step, tokens) * row
        assert 64 * MiB // row <= step and chunk <= 256 * MiB
        assert chunk <= 64 * MiB or 4.5 * chunk <= 3 * tokens * row
