"""The MoE FFN's two paths: grouped matmuls over expert-sorted tokens (no host read) and the
loop over experts. Same result to the bit on the CPU, and a build whose grouped kernel refuses
the call falls back to the loop for that device and dtype."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from specoffload.models import layers
from specoffload.sources.constructed import mixtral_8x7b


def _case(dtype, tokens=300, H=64, I=96, E=8):
    spec = replace(mixtral_8x7b(1), hidden_size=H, intermediate_size=I, num_experts=E)
    g = torch.Generator().manual_seed(0)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.1).to(dtype)  # noqa: E731
    w = {"router": r(E, H) * 10, "w_gate": r(E, I, H), "w_up": r(E, I, H), "w_down": r(E, H, I)}
    return spec, w, r(tokens, H) * 10


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no grouped matmul")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_equals_loop(dtype):
    spec, w, x = _case(dtype)
    want = layers.moe_ffn(spec, w, x, grouped=False)
    assert torch.equal(layers.moe_ffn(spec, w, x, grouped=True), want)
    # an expert no token chose: an empty group
    w2 = dict(w, router=w["router"].clone())
    w2["router"][3] = -1e4
    assert torch.equal(layers.moe_ffn(spec, w2, x, grouped=True), layers.moe_ffn(spec, w2, x, grouped=False))


def test_refused_grouped_matmul_falls_back_to_the_loop(monkeypatch):
    spec, w, x = _case(torch.float32, tokens=40)
    calls = []

    def refuse(*a, **k):
        calls.append(1)
        raise RuntimeError("grouped gemm is only supported on sm90")

    monkeypatch.setattr(torch, "_grouped_mm", refuse, raising=False)
    monkeypatch.setattr(layers, "_GROUPED_MM_FAILED", set())
    want = layers.moe_ffn(spec, w, x, grouped=False)
    assert torch.equal(layers.moe_ffn(spec, w, x), want) and calls == [1]
    assert torch.equal(layers.moe_ffn(spec, w, x), want) and calls == [1]  # not tried again
    assert ("cpu", torch.float32) in layers._GROUPED_MM_FAILED


def test_out_of_memory_in_the_grouped_path_is_not_a_refusal(monkeypatch):
    spec, w, x = _case(torch.float32, tokens=8)

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(torch, "_grouped_mm", oom, raising=False)
    monkeypatch.setattr(layers, "_GROUPED_MM_FAILED", set())
    with pytest.raises(torch.OutOfMemoryError):
        layers.moe_ffn(spec, w, x)
    assert not layers._GROUPED_MM_FAILED


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no grouped matmul")
def test_grouped_in_chunks_equals_loop(monkeypatch):
    # Chunks of 37 pairs cut through experts' groups (600 pairs, 8 experts): each chunk's group
    # boundaries must still be right (a wrong one multiplies rows by another expert's weights:
    # errors of order 1). Not to the bit: a CPU matmul of a few rows may round differently from
    # one of the whole group (seen: 4e-7 of outputs of order 1).
    spec, w, x = _case(torch.float32)
    want = layers.moe_ffn(spec, w, x, grouped=False)
    monkeypatch.setattr(layers, "MOE_CHUNK_BYTES", 37 * w["w_gate"].shape[1] * x.element_size())
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    torch.testing.assert_close(layers.moe_ffn(spec, w, x, grouped=True), want, rtol=1e-5, atol=1e-5)
    assert max(calls) == 37 and len(calls) == 3 * -(-600 // 37)
