"""An fp8 target on the GPU: the fp8 kernels against the CPU's dequantize path, and fp8
checkpoints through the actors speculating losslessly. CI has no GPU: scripts/gpu_check.py
runs these (`pytest -m cuda`)."""

from __future__ import annotations

import pytest
import torch

import gpu  # noqa: E402  (tests/ is on sys.path: conftest.py)
from hf_reference import PROMPTS, differ_beyond_near_ties
from specoffload.configs.sampling_params import SamplingParams
from specoffload.llm import LLM
from specoffload.models.fp8_weights import Fp8Weight

cuda_only = gpu.cuda_only("fp8 kernels need a GPU")


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _experts(E=8, out=512, inp=256, static=False):
    g = torch.Generator().manual_seed(0)
    w = Fp8Weight.quantize(torch.randn(E, out, inp, generator=g) * 0.05)
    if static:
        w = Fp8Weight(w.data, w.scale, torch.rand(E, generator=g) * 0.01 + 0.01)
    return w.to("cuda")


@cuda_only
@pytest.mark.parametrize("static", [False, True])
def test_fp8_kernel_matches_the_dequantize_path(static):
    """_scaled_mm with per-row weight scales and per-token or static input scales computes what
    the CPU's reference path does, up to bf16 output rounding."""
    from specoffload.models import fp8_weights

    w = _experts(1, 4096, 4096, static)[0]
    x = torch.randn(192, 4096, device="cuda", dtype=torch.bfloat16)
    y = w._scaled(x)  # the kernel itself: a refusal here is a failure, not a fallback
    assert _rel(y, w.reference_linear(x)) < 1e-2
    assert ("cuda", torch.bfloat16) not in fp8_weights._SCALED_MM_FAILED


@cuda_only
@pytest.mark.parametrize("static", [False, True])
def test_fp8_moe_layer_on_the_gpu_matches_the_cpu_reference(static):
    """An MoE FFN over fp8 experts on the GPU (the fp8 grouped matmul, or the loop over
    experts where the build refuses it) gives what the CPU's dequantize path gives, up to the
    kernels' bf16 rounding."""
    from specoffload.models.layers import moe_ffn
    from specoffload.sources.constructed import mixtral_8x7b
    from dataclasses import replace

    spec = replace(mixtral_8x7b(1), hidden_size=256, intermediate_size=512)
    g = torch.Generator().manual_seed(1)
    w = {"router": torch.randn(8, 256, generator=g).to(torch.bfloat16)}
    for k, shape in (("w_gate", (8, 512, 256)), ("w_up", (8, 512, 256)), ("w_down", (8, 256, 512))):
        f = Fp8Weight.quantize(torch.randn(*shape, generator=g) * 0.05)
        w[k] = Fp8Weight(f.data, f.scale, torch.rand(8, generator=g) * 0.01 + 0.01) if static else f
    x = torch.randn(300, 256, generator=g).to(torch.bfloat16)
    want = moe_ffn(spec, w, x)
    got = moe_ffn(spec, {k: v.to("cuda") for k, v in w.items()}, x.cuda())
    assert _rel(got.cpu(), want) < 2e-2


@cuda_only
def test_grouped_fp8_experts_use_the_fp8_kernel():
    """Informative: where this build refuses the fp8 grouped matmul, fp8 MoE layers run their
    loop over experts (one fp8 matmul each, a device sync per layer); the error says why."""
    w = _experts()
    counts = torch.full((8,), 32, device="cuda")
    y = w.grouped(torch.randn(256, 256, device="cuda", dtype=torch.bfloat16), torch.cumsum(counts, 0).to(torch.int32),
                  None)
    assert y.shape == (256, 512)


@cuda_only
@pytest.mark.parametrize("family,fmt", [("mixtral", "fp8-dynamic"), ("qwen3_moe", "block")])
def test_fp8_target_on_the_gpu_speculates_losslessly(ray_session, fp8_dir, family, fmt):
    """An fp8 checkpoint streamed from host memory into fp8 weight slots on the GPU: greedy
    speculative output equals plain decoding of the same target on the same GPU, up to bf16's
    near-ties. Both targets are MoE, so a swap of plain's top two passes at any gap while the
    drift stays rounding-sized: on the H200 the qwen3_moe case took the other token at one of 4
    prompts, once where plain's top-2 gap was 0.062 and once (session 14, the first token) with
    the two gaps 0.156 together, over the 0.106 that the drift where the runs agree allows."""
    d = fp8_dir(family, fmt)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    sp = SamplingParams(max_tokens=16, ignore_eos=True, logprobs=2)
    outs = []
    for draft in (None, "self:1"):
        with LLM(str(d), draft=draft, device="cuda", dtype="bfloat16", k=3, batch_size=2, progress=False) as llm:
            outs.append(llm.generate(prompts, sp))
    # bf16: equal up to a near-tie of plain decoding's (near_ties.py), and mostly equal
    assert differ_beyond_near_ties(outs[1], outs[0], moe_router=True) == []
    assert sum(s.outputs[0].token_ids == o.outputs[0].token_ids for s, o in zip(*outs)) >= len(PROMPTS) // 2
