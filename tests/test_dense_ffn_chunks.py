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
    monkeypatch.setattr(layers, "DENSE_CHUNK_BYTES", 7 * 40 * x.element_size())  # 7 rows a chunk
    calls = []
    real = layers._dense_ffn
    monkeypatch.setattr(layers, "_dense_ffn", lambda s, w, x: calls.append(x.shape[0]) or real(s, w, x))
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
    monkeypatch.setattr(layers, "DENSE_CHUNK_BYTES", 5 * tgt.spec.intermediate_size * 4)  # 5 tokens a chunk
    draft = ResidentModel(tgt.spec.with_layers(1), tgt.glob, tgt.layers[:1])
    reqs = [Request(i, p, SamplingParams(max_tokens=16, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
    Generator(ReferenceBackend(tgt, draft), RunConfig(schedule="single", k=3, batch_size=len(PROMPTS))).run(reqs)
    assert [r.out for r in reqs] == want
