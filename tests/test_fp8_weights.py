"""A draft whose matrices are stored in fp8: close to its full-precision self, and the output
stays the target's (the target verifies every token).

The CUDA tests (fp8 tensor-core matmuls, and the graphed draft step over them) run on the
device machine: `pytest tests/test_fp8_weights.py`."""

from __future__ import annotations

import pytest
import torch

from hf_reference import PROMPTS, hf_greedy
from specoffload.configs.run_config import RunConfig
from specoffload.configs.sampling_params import SamplingParams
from specoffload.errors import ConfigError
from specoffload.llm import LLM
from specoffload.models import fp8_weights
from specoffload.models.checkpoint import Checkpoint
from specoffload.models.fp8_weights import Fp8Weight, quantize_layer
from specoffload.models.layers import post_attention, pre_attention, rope_cos_sin
from specoffload.models.resident import ResidentModel
from specoffload.models.spec import load_spec
from specoffload.scheduler.generator import Generator
from specoffload.scheduler.reference_backend import ReferenceBackend
from specoffload.scheduler.request import Request
from specoffload.speculation.runner import SpecRunner
import gpu  # noqa: E402  (tests/ is on sys.path: conftest.py)

cuda_only = gpu.cuda_only("fp8 tensor cores need a GPU")


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _weight(out=96, inp=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.02
    w[3] *= 1000.0  # one loud row: a single scale for the matrix would flatten every other row to zero
    return w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_matmul_tracks_full_precision_row_by_row(dtype):
    w = _weight()
    x = torch.randn(5, 7, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    q = Fp8Weight.quantize(w)
    y, ref = q.linear(x), torch.nn.functional.linear(x.float(), w)
    assert y.shape == ref.shape and y.dtype == dtype
    assert q.data.dtype == torch.float8_e4m3fn and q.nbytes() == w.numel() + 4 * 96  # a byte each, a scale a row
    # e4m3 keeps 3 mantissa bits: ~2-4% relative error per product, on every row alike.
    quiet = [i for i in range(96) if i != 3]
    assert _rel(y[..., quiet], ref[..., quiet]) < 0.08
    assert _rel(y[..., 3], ref[..., 3]) < 0.08
    assert _rel(q.dequantize(torch.float32), w) < 0.05


def test_dequantize_path_computes_what_the_kernel_does():
    """The CPU's path (input quantized and dequantized, weight widened: the reference) and the
    fp8 kernel (torch's CPU build emulates _scaled_mm) give the same product up to summation order."""
    w, x = _weight(), torch.randn(9, 64, generator=torch.Generator().manual_seed(2))
    q = Fp8Weight.quantize(w)
    kernel = q._scaled(x)
    widened = q.linear(x, torch.ones(96))
    assert ("cpu", torch.float32) not in fp8_weights._SCALED_MM_FAILED  # the CPU never tries the kernel
    ref = torch.nn.functional.linear(x, w, torch.ones(96))
    assert _rel(widened, ref) < 0.08 and _rel(kernel + 1, widened) < 5e-3  # the kernel writes bf16


def _counting_quantizations(monkeypatch) -> list:
    calls = []
    real = Fp8Weight.quantize_input

    def counted(self, x2, sx):
        calls.append(tuple(x2.shape))
        return real(self, x2, sx)

    monkeypatch.setattr(Fp8Weight, "quantize_input", counted)
    return calls


def test_matrices_reading_one_input_quantize_it_once(monkeypatch):
    """q/k/v (and gate/up) read the same input: with per-token input scales it is quantized
    once for all of them, and each product is bit for bit what quantizing it alone gives, in
    the fp8 kernel's path (torch's CPU build runs _scaled_mm) and in the reference's."""
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    ws = [Fp8Weight.quantize(_weight(out, 64, seed)) for out, seed in ((96, 0), (32, 1), (32, 2))]
    alone = [w._scaled(x) for w in ws] + [w.reference_linear(x) for w in ws]
    calls = _counting_quantizations(monkeypatch)
    shared = fp8_weights.SharedInput()
    together = [w._scaled(x, shared) for w in ws]
    assert len(calls) == 1
    shared = fp8_weights.SharedInput()
    together += [w.reference_linear(x, None, shared) for w in ws]
    assert len(calls) == 2
    assert all(torch.equal(a, b) for a, b in zip(alone, together))


@pytest.mark.parametrize("static,share", [(False, True), (True, True), (False, False)])
def test_a_layer_quantizes_each_input_once_unless_scales_are_static(monkeypatch, static, share):
    """A dense layer's halves: one quantization for q/k/v and one each for gate/up and down.
    A checkpoint's static input scales are each matrix's own: nothing is shared then. Nor with
    SHARE_INPUTS off (what profile_prefill_layer --before times)."""
    monkeypatch.setattr(fp8_weights, "SHARE_INPUTS", share)
    from transformers import LlamaConfig

    from specoffload.models.layers import dense_ffn
    from specoffload.models.spec import ModelSpec

    spec = ModelSpec.from_hf_config(LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                                num_attention_heads=4, num_key_value_heads=2), dtype="float32")
    g = torch.Generator().manual_seed(4)
    shapes = {"q": (64, 64), "k": (32, 64), "v": (32, 64), "gate": (128, 64), "up": (128, 64), "down": (64, 128)}
    w = {"ln1": torch.ones(64)}
    for name, shape in shapes.items():
        q = Fp8Weight.quantize(torch.randn(*shape, generator=g) * 0.05)
        w[name] = Fp8Weight(q.data, q.scale, torch.tensor([0.01]) if static else None)
    h = torch.randn(5, 64, generator=g)
    cos, sin = rope_cos_sin(spec, torch.arange(5), torch.float32)
    calls = _counting_quantizations(monkeypatch)
    pre_attention(spec, w, h, cos, sin)
    shared = share and not static
    assert len(calls) == (1 if shared else 3)
    calls.clear()
    dense_ffn(spec, w, h)
    assert len(calls) == (2 if shared else 3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_one_kernel_quantization_gives_the_two_steps_values(dtype):
    """div_into_fp8 (CUDA's input quantization) is bit for bit (x / s).to(fp8), including
    values that round across fp8's steps, the largest ones and zeros."""
    x = (torch.randn(64, 256, generator=torch.Generator().manual_seed(5)) * 3).to(dtype)
    x[0, :4] = torch.tensor([0.0, -0.0, 1e-30, -1e30]).to(dtype)
    sx = Fp8Weight.quantize(_weight()).input_scales(x)
    two = (x / sx).to(torch.float8_e4m3fn)
    one = fp8_weights.div_into_fp8(x, sx)
    assert one.dtype == torch.float8_e4m3fn and torch.equal(one.view(torch.uint8), two.view(torch.uint8))


@cuda_only
def test_input_quantization_on_cuda_is_one_kernel_and_the_same():
    x = (torch.randn(64, 256, generator=torch.Generator().manual_seed(6)) * 3).to(torch.bfloat16).cuda()
    w = Fp8Weight.quantize(_weight(96, 256)).to("cuda")
    sx = w.input_scales(x)
    got = w.quantize_input(x, sx)
    assert "cuda" not in fp8_weights._DIV_INTO_FP8_FAILED
    assert torch.equal(got.view(torch.uint8), (x / sx).to(torch.float8_e4m3fn).view(torch.uint8))


def test_only_dense_matrices_are_quantized():
    w = {"q": torch.randn(8, 4), "ln1": torch.ones(4), "q_bias": torch.zeros(8), "w_gate": torch.randn(2, 6, 4),
         "router": torch.randn(2, 4)}
    out = quantize_layer(w)
    assert isinstance(out["q"], Fp8Weight)
    assert all(out[k] is w[k] for k in ("ln1", "q_bias", "w_gate", "router"))
    assert quantize_layer(out)["q"] is out["q"]  # already quantized: left alone


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_stacked_matrices_give_each_part_its_own_product(tiny_dir, family):
    """q/k/v and gate/up stacked into one fp8 matrix each (biases and q/k norms applied per
    part): a layer's outputs stay within fp8's error of the full-precision layer's."""
    spec = load_spec(tiny_dir(family))
    w = Checkpoint(tiny_dir(family)).read_layer(0)
    wq = quantize_layer(w)
    assert {"qkv", "gate_up"} <= set(wq) and not {"q", "k", "v", "gate", "up"} & set(wq)
    h = torch.randn(6, spec.hidden_size, generator=torch.Generator().manual_seed(3))
    cos, sin = rope_cos_sin(spec, torch.arange(6), h.dtype)
    for a, b in zip(pre_attention(spec, wq, h, cos, sin), pre_attention(spec, w, h, cos, sin)):
        assert a.shape == b.shape and _rel(a, b) < 0.08
    attn = torch.randn(6, spec.num_heads * spec.head_dim, generator=torch.Generator().manual_seed(4))
    assert _rel(post_attention(spec, wq, h, attn) - h, post_attention(spec, w, h, attn) - h) < 0.08


def _run(target, draft, k=4, schedule="single"):
    reqs = [Request(i, p, SamplingParams(max_tokens=24, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
    stats = Generator(ReferenceBackend(target, draft), RunConfig(schedule=schedule, k=k, k_max=8, batch_size=2)).run(reqs)
    return [r.out for r in reqs], stats


@pytest.mark.parametrize("schedule", ["single", "dual"])
def test_fp8_copy_of_the_target_is_lossless_and_still_agrees(tiny_dir, schedule):
    """The target's own weights in fp8 as its draft: output must be the target's exactly, and
    the draft must still agree far more often than an unrelated draft does (on these tiny random
    models: fp8 copy 0.69 per proposed token, a bf16 copy 1.0, another random draft 0.003)."""
    d = tiny_dir("llama")
    tgt = ResidentModel.from_source(Checkpoint(d))
    draft = ResidentModel.from_source(Checkpoint(d), fp8_weights=True)
    assert draft.weight_bytes() < tgt.weight_bytes()
    got, stats = _run(tgt, draft, schedule=schedule)
    assert got == hf_greedy(d, PROMPTS, 24)
    assert stats.accepted / stats.proposed > 0.5


def test_fp8_draft_of_another_size_through_the_actors(ray_session, tiny_dir):
    """A MoE target, a smaller MoE draft in fp8 (attention matrices fp8, experts as they were)."""
    d = tiny_dir("mixtral")
    other = tiny_dir("mixtral", seed=2, num_hidden_layers=2)
    with LLM(str(d), draft=str(other), draft_fp8=True, schedule="single", k=3, batch_size=2, progress=False) as llm:
        assert llm.plan.draft_fp8
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(max_tokens=20, ignore_eos=True))
        assert llm.last_stats["acceptance"] is not None
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(d, PROMPTS, 20)


def test_self_draft_refuses_fp8(tiny_dir):
    with pytest.raises(ConfigError, match="separate draft checkpoint"):
        LLM(str(tiny_dir("llama")), draft="self:1", draft_fp8=True, engine="reference", progress=False)


@cuda_only
def test_fp8_kernel_on_cuda_tracks_the_widened_product():
    w = _weight(4096, 4096).cuda()
    x = torch.randn(192, 4096, device="cuda", dtype=torch.bfloat16)
    q = Fp8Weight.quantize(w.to(torch.bfloat16))
    assert ("cuda", torch.bfloat16) not in fp8_weights._SCALED_MM_FAILED
    y = q._scaled(x)  # the kernel itself: a refusal here is a failure, not a fallback
    assert _rel(y, torch.nn.functional.linear(x.float(), w)) < 0.08


@cuda_only
def test_graphed_fp8_draft_proposes_what_eager_steps_do(tiny_dir):
    """CUDA graphs over fp8 matmuls (and their per-token input scales) replay the eager step."""
    from test_draft_graph import _rounds

    draft = ResidentModel.from_source(Checkpoint(tiny_dir("llama", seed=1, num_hidden_layers=2)), "cuda",
                                      fp8_weights=True)
    prompts = [p + [5] * (i % 3) for i, p in enumerate(PROMPTS)] * 2
    graphed = SpecRunner(draft, "cuda", window=4, fp8=True, sinks=2)
    eager = SpecRunner(draft, "cuda", window=4, fp8=True, sinks=2, graphs=False)
    want = _rounds(eager, draft, prompts, k=5)
    got = _rounds(graphed, draft, prompts, k=5)
    assert eager.graph_steps == 0 and graphed.graph_steps >= 5 * 4
    for w, o in zip(want, got):
        assert torch.equal(w, o)
