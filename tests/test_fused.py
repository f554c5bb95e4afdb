"""models/fused.py (plan.fused_prefill): a layer with its elementwise work fused by torch.compile
computes what the eager layer computes, bit for bit, on the CPU. The fused groups are compiled
here with inductor's C++ backend (~10-30 s in all on a 2-core machine)."""

import pytest
import torch

from specoffload.models import fused as fused_mod
from specoffload.models.forward import Forward
from specoffload.models.fp8_weights import Fp8Weight, flattened
from specoffload.models.layers import layer_shapes, rope_cos_sin
from specoffload.models.spec import ModelSpec
from specoffload.sources.fp8_quantize import TARGET_MATRICES

from gpu import cuda_only


def _spec(**extra):
    from transformers import LlamaConfig, Qwen3Config

    cfg = dict(vocab_size=64, hidden_size=64, intermediate_size=160, num_hidden_layers=1,
               num_attention_heads=4, num_key_value_heads=2)
    if extra.pop("qk_norm", False):
        return ModelSpec.from_hf_config(Qwen3Config(**cfg, head_dim=16, **extra), dtype="bfloat16")
    return ModelSpec.from_hf_config(LlamaConfig(**cfg, **extra), dtype="bfloat16")


def _layer(spec, fp8: str, seed: int = 0) -> dict:
    """Layer 0 as a weight slot holds it: flat, fp8 matrices per row ('token': per-token inputs,
    'static': a checkpoint's static input scales) or bf16 ('none')."""
    g = torch.Generator().manual_seed(seed)
    w = {}
    for name, shape in layer_shapes(spec, 0).items():
        t = torch.randn(*shape, generator=g) * (0.3 if len(shape) > 1 else 0.1) + (1.0 if len(shape) == 1 else 0.0)
        if fp8 != "none" and name in TARGET_MATRICES:
            q = Fp8Weight.quantize(t)
            t = Fp8Weight(q.data, q.scale, torch.tensor([0.02]) if fp8 == "static" else None)
        w[name] = t if isinstance(t, Fp8Weight) else t.to(torch.bfloat16)
    return flattened(w)


def _run(spec, w, tokens: int, fused, device="cpu"):
    g = torch.Generator().manual_seed(7)
    h = torch.randn(tokens, spec.hidden_size, generator=g).to(torch.bfloat16).to(device)
    cos, sin = rope_cos_sin(spec, torch.arange(tokens, device=device), torch.bfloat16)
    f = Forward(spec, None, h, cos, sin, fused)
    q, k, v = f.qkv(w)
    attn = torch.randn(tokens, spec.num_heads * spec.head_dim, generator=g).to(torch.bfloat16).to(device)
    f.finish(w, attn)
    return q, k, v, f.h


@pytest.mark.parametrize("fp8, qk_norm", [("token", False), ("token", True), ("static", False), ("none", False)])
def test_a_fused_layer_is_the_eager_layer_bit_for_bit(fp8, qk_norm):
    """q, k, v and the layer's output equal the eager layer's exactly, at two token counts (one
    compile serves both: a prefill's sub-batches differ in length); with per-token fp8 inputs
    the groups run compiled, with static input scales or bf16 matrices the norms and the
    activation run eagerly (only RoPE is compiled) and still agree."""
    spec = _spec(qk_norm=qk_norm)
    w = _layer(spec, fp8)
    fused = fused_mod.Fused()
    for tokens in (24, 37):
        eager, out = _run(spec, w, tokens, None), _run(spec, w, tokens, fused)
        for name, a, b in zip(("q", "k", "v", "h"), eager, out):
            assert a.dtype == b.dtype and torch.equal(a, b), f"{name} differs at {tokens} tokens"
    groups = {fn.__name__ for fn in fused._compiled}
    assert groups == ({"_norm_q", "_add_norm_q", "_rope", "_act_mul_q"} if fp8 == "token" else {"_rope"})
    assert fused.failed is None  # they ran compiled, not through the eager fallback


def test_a_chunked_ffn_takes_its_rows_of_the_fused_quantization(monkeypatch):
    """A dense FFN run in row chunks (layers.dense_chunk_rows) takes each chunk's rows of the
    norm's fused quantization: still the eager layer's output bit for bit."""
    from specoffload.models import layers

    monkeypatch.setattr(layers, "DENSE_CHUNK_BYTES", 160 * 2 * 8)  # 8 rows a chunk
    monkeypatch.setattr(layers, "DENSE_CHUNK_MAX_BYTES", 160 * 2 * 8)
    spec = _spec()
    w = _layer(spec, "token", seed=3)
    eager, out = _run(spec, w, 30, None), _run(spec, w, 30, fused_mod.Fused())
    assert torch.equal(eager[3], out[3])


def _compiled_groups():
    """A function for `__ray_call__` (made here, so Ray pickles it by value): the fused groups
    the executor's process has compiled, and why compiling failed (None: it did not)."""
    def read(executor):
        from specoffload.models.fused import FUSED

        return sorted(fn.__name__ for fn in FUSED._compiled), FUSED.failed
    return read


def test_the_actors_fused_prefill_keeps_greedy_output(ray_session, tiny_dir):
    """plan.fused_prefill through the actors, on a dense fp8 target (quantize at load): greedy
    speculative output equals plain decoding of the same fp8 target, and the executor did run
    the prefill's groups compiled (with the plan field off it compiles none)."""
    import ray
    from hf_reference import PROMPTS
    from specoffload.actors.supervisor import actors
    from specoffload.configs.sampling_params import SamplingParams
    from specoffload.llm import LLM
    from specoffload.placement.plan import Plan

    d = tiny_dir("llama")
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    sp = SamplingParams(max_tokens=12, ignore_eos=True)
    with LLM(str(d), engine="reference", quantize="fp8", progress=False) as ref:
        want = [o.outputs[0].token_ids for o in ref.generate(prompts, sp)]
    for on in (True, False):
        with LLM(str(d), plan=Plan(device="cpu", fused_prefill=on), draft="self:1", quantize="fp8",
                 schedule="single", k=3, batch_size=2, progress=False) as llm:
            got = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
            groups, failed = ray.get(actors(llm.run_id)["gpu_executor"].__ray_call__.remote(_compiled_groups()),
                                     timeout=60)
        assert got == want
        assert groups == (["_act_mul_q", "_add_norm_q", "_norm_q", "_rope"] if on else []) and failed is None


def test_a_machine_that_cannot_compile_runs_the_groups_eagerly(monkeypatch):
    """Where torch.compile fails (no compiler, no triton), the groups run eagerly, the same
    values, with one warning; later calls do not try again."""
    def broken(*a, **k):
        def call(*args):
            raise RuntimeError("no C compiler\nsecond line")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    spec = _spec()
    w = _layer(spec, "token")
    fused = fused_mod.Fused()
    with pytest.warns(UserWarning, match=r"compiling failed, running eagerly \(RuntimeError: no C compiler\)"):
        out = _run(spec, w, 24, fused)
    eager = _run(spec, w, 24, None)
    assert all(torch.equal(a, b) for a, b in zip(eager, out))
    assert fused.failed == "RuntimeError: no C compiler" and len(fused._compiled) == 1


@cuda_only("the groups compiled by triton need a GPU")
@pytest.mark.parametrize("chunk_rows", [None, 5])
def test_the_fused_groups_compile_on_cuda_and_agree_with_eager(chunk_rows, monkeypatch):
    """On CUDA the groups compile (triton) with no fallback, and the layer agrees with the eager
    one: bit for bit where the device's reductions sum in eager's order, else within a bf16
    rounding or two of a value (norm-relative error under 1%; fp8 inputs that round the other
    way move a q/k/v element by one fp8 step, ~6%, which the matmul averages). Every matmul
    stays on the fp8 kernel, FFN chunks of an odd row count included (their shared scales
    start mid-tensor; _scaled_mm refusing them widened every matrix after, 2.6x slower)."""
    from specoffload.models import fp8_weights, layers

    if chunk_rows:
        monkeypatch.setattr(layers, "DENSE_CHUNK_BYTES", 160 * 2 * chunk_rows)
        monkeypatch.setattr(layers, "DENSE_CHUNK_MAX_BYTES", 160 * 2 * chunk_rows)
    monkeypatch.setattr(fp8_weights, "_SCALED_MM_FAILED", {})
    spec = _spec()
    w = {k: v.cuda() for k, v in _layer(spec, "token").items()}
    fused = fused_mod.Fused()
    with torch.inference_mode():
        for tokens in (24, 300):
            eager, out = _run(spec, w, tokens, None, "cuda"), _run(spec, w, tokens, fused, "cuda")
            for name, a, b in zip(("q", "k", "v", "h"), eager, out):
                rel = ((a.float() - b.float()).norm() / a.float().norm()).item()
                assert rel < 1e-2, f"{name} at {tokens} tokens: relative error {rel:.3g}"
    assert fused.failed is None
    assert {fn.__name__ for fn in fused._compiled} == {"_norm_q", "_add_norm_q", "_rope", "_act_mul_q"}
    assert fp8_weights._SCALED_MM_FAILED == {}


def test_the_plan_fuses_prefill_by_default_on_cuda_only():
    """plan.fused_prefill None (the default) becomes on for a CUDA plan and off for a CPU one
    (compiling on a CPU is slow and its eager kernels lose less); a choice stays as made, also
    through a plan file."""
    from dataclasses import asdict

    from specoffload.placement.plan import Plan

    assert Plan(device="cuda").fused_prefill is True and Plan().fused_prefill is False
    assert Plan(device="cuda", fused_prefill=False).fused_prefill is False
    assert Plan(fused_prefill=True).fused_prefill is True
    assert Plan.from_dict(asdict(Plan(device="cuda", fused_prefill=False))).fused_prefill is False
