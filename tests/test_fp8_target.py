"""An fp8 target (issue 19): fp8 checkpoints in both formats users download, and a bf16 one
quantized at load, computed from their fp8 bytes; speculation stays lossless against it.

The checkpoints are tiny, written by tests/fp8_checkpoints.py (the `fp8_dir` fixture). Bad fp8
input: test_fp8_target_errors.py; the fp8 kernels on a GPU: test_fp8_target_gpu.py. transformers reads them
on the CPU: compressed-tensors checkpoints through the `compressed-tensors` package, which
runs each quantized Linear with its input quantized and dequantized the way an fp8 kernel sees
it; block-wise fp8 ones dequantized to full precision at load (transformers' CPU fallback for
that format), inputs unquantized, as ours on that format.
"""

from __future__ import annotations

import pytest
import torch

from hf_reference import PROMPTS
from specoffload.configs.run_config import RunConfig
from specoffload.configs.sampling_params import SamplingParams
from specoffload.llm import LLM
from specoffload.models.checkpoint import Checkpoint
from specoffload.models.fp8_weights import FP8, Fp8Weight
from specoffload.models.resident import ResidentModel
from specoffload.scheduler.generator import Generator
from specoffload.scheduler.reference_backend import ReferenceBackend
from specoffload.scheduler.request import Request
from specoffload.sources.fp8_quantize import Fp8Quantized

FORMATS = ("fp8-dynamic", "fp8-static", "block")


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


TOKENS = torch.tensor(PROMPTS[0])


def _our_logits(source) -> torch.Tensor:
    m = ResidentModel.from_source(source)
    return m.forward(m.new_cache(1, 32), TOKENS, torch.tensor([len(TOKENS)]), which="all")


def _hf_logits(folder) -> torch.Tensor:
    import transformers as tf

    m = tf.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        return m(TOKENS[None]).logits[0].float()


class _UnquantizedInputs(Fp8Weight):
    """An fp8 weight whose inputs stay unquantized: what transformers does for MoE experts."""

    def input_scales(self, x2, expert_of_row=None):
        return None

    def __getitem__(self, e):
        s = super().__getitem__(e)
        return _UnquantizedInputs(s.data, s.scale, s.input_scale)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family", ["llama", "mixtral", "qwen3_moe"])
def test_logits_match_transformers_on_the_same_fp8_checkpoint(fp8_dir, family, fmt):
    """The models are fp32, so the same fp8 values, scales and input quantization give the same
    logits up to summation order: within 1e-4 relative.

    One difference is transformers', not ours: its MoE experts are one fused module, not the
    Linear layers compressed-tensors quantizes inputs for, so it multiplies the experts' fp8
    weights by unquantized inputs. Against it our experts run with inputs left unquantized; as
    they run (inputs quantized, as an fp8 kernel needs) the logits stay within 0.2: e4m3 keeps 3
    mantissa bits, so each quantized input is off by up to 1/16 (6%), ~3% on average, and
    these tiny random models (weights of std 0.15) amplify that over three layers (0.06-0.10 seen)."""
    d = fp8_dir(family, fmt)
    ck = Checkpoint(d)
    assert ck.spec.weights == "fp8"
    w = ck.read_layer(0)
    assert w["q"].dtype == FP8 and w["q.scale"].dtype == torch.float32 and w["ln1"].dtype == torch.float32
    assert ("router" not in w) or w["router"].dtype == torch.float32  # routers stay unquantized
    ref = _hf_logits(d)
    moe = ck.spec.is_moe and fmt != "block"
    m = ResidentModel.from_source(ck)
    if moe:
        as_run = m.forward(m.new_cache(1, 32), TOKENS, torch.tensor([len(TOKENS)]), which="all")
        assert _rel(as_run, ref) < 0.2
        for layer in m.layers:
            for k in ("w_gate", "w_up", "w_down"):
                if k in layer:
                    v = layer[k]
                    layer[k] = _UnquantizedInputs(v.data, v.scale, v.input_scale)
    got = m.forward(m.new_cache(1, 32), TOKENS, torch.tensor([len(TOKENS)]), which="all")
    assert _rel(got, ref) < 1e-4


def test_block_scales_cover_partial_blocks():
    """A 288 x 160 matrix has 3 x 2 blocks, the last row and column of them partial."""
    from fp8_checkpoints import dequantize, quantize_tensor

    w = torch.randn(288, 160, generator=torch.Generator().manual_seed(0))
    q, s = quantize_tensor(w, "block")
    assert s.shape == (3, 2)
    f = Fp8Weight(q, s)
    assert f.block and torch.equal(f.dequantize(torch.float32), dequantize(q, s, "block"))
    assert _rel(f.linear(torch.ones(3, 160)), torch.ones(3, 160) @ dequantize(q, s, "block").T) < 1e-6
    stacked = Fp8Weight(torch.stack([q, q]), torch.stack([s, 2 * s]))  # experts: each its own grid
    assert torch.equal(stacked[1].dequantize(torch.float32), 2 * dequantize(q, s, "block"))
    # the GPU's widening to bf16 through a blocked view (whole blocks): bf16's rounding, 2^-8
    q, s = quantize_tensor(torch.randn(2, 384, 256, generator=torch.Generator().manual_seed(1)).view(-1, 256), "block")
    whole = Fp8Weight(q.view(2, 384, 256), s.view(2, 3, 2))
    assert _rel(whole.dequantize(torch.bfloat16), whole.dequantize(torch.float32)) < 4e-3


def test_quantize_at_load_is_the_fp8_dynamic_checkpoint(tiny_dir, fp8_dir):
    """A bf16 checkpoint quantized as it loads gives exactly the fp8 bytes and scales of the same
    weights saved as a compressed-tensors FP8-dynamic checkpoint (both: per output channel,
    max |w| / 448), so the same logits, each value within e4m3's rounding (1/16 relative) of
    the bf16 one."""
    for family in ("llama", "mixtral", "qwen2_moe"):  # qwen2_moe: a shared expert, its gate left as it is
        q = Fp8Quantized(Checkpoint(tiny_dir(family)))
        ck = Checkpoint(fp8_dir(family, "fp8-dynamic"))
        assert q.spec.weights == "fp8"
        orig, got, want = Checkpoint(tiny_dir(family)).read_layer(1), q.read_layer(1), ck.read_layer(1)
        assert sorted(got) == sorted(want)
        for k, v in want.items():
            assert torch.equal(got[k].view(torch.uint8) if v.dtype == FP8 else got[k],
                               v.view(torch.uint8) if v.dtype == FP8 else v), k
        assert "shared_gate.scale" not in got and "router.scale" not in got
        for k in ("q", "down" if "down" in orig else "w_down"):
            deq = Fp8Weight(got[k], got[k + ".scale"]).dequantize(torch.float32)
            err = (deq - orig[k]).abs() / orig[k].abs().amax(dim=-1, keepdim=True)
            assert float(err.max()) <= 1 / 16
        # same bytes in; fp32 GEMMs may still sum in another order (buffer alignment picks the kernel)
        assert _rel(_our_logits(q), _our_logits(ck)) < 1e-6


def test_quantize_at_load_through_the_actors_writes_fp8_to_host_memory(ray_session, tiny_dir):
    """LLM(quantize="fp8"): the loader's /dev/shm files hold fp8 matrices (about half the bytes
    of the bf16 run's), and greedy speculative output equals plain decoding of the same fp8
    target (the in-process reference path); a self:1 draft is the fp8 target's own first layer."""
    d = tiny_dir("mixtral")
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    sp = SamplingParams(max_tokens=16, ignore_eos=True)
    with LLM(str(d), engine="reference", quantize="fp8", progress=False) as ref:
        want = [o.outputs[0].token_ids for o in ref.generate(prompts, sp)]
    with LLM(str(d), draft="self:1", quantize="fp8", schedule="single", k=3, batch_size=2, progress=False) as llm:
        assert llm.spec.weights == "fp8"
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
        from dataclasses import replace

        from specoffload.actors.io_loader import run_dir

        files = sum(f.stat().st_size for f in run_dir(llm.run_id).glob("layer_*.bin"))
        layers = range(llm.spec.num_layers)
        assert sum(llm.spec.layer_bytes(j) for j in layers) <= files  # what the planner counts, plus alignment
        assert files < 0.6 * sum(replace(llm.spec, weights="").layer_bytes(j) for j in layers)  # fp32 tiny model
        assert llm.last_stats["acceptance"] is not None
    assert got == want


def _spec_vs_plain(target, draft, k=3):
    outs = []
    for sched, dr in (("none", None), ("single", draft)):
        reqs = [Request(i, p, SamplingParams(max_tokens=10, ignore_eos=True)) for i, p in enumerate(PROMPTS[:3])]
        Generator(ReferenceBackend(target, dr), RunConfig(schedule=sched, k=k, k_max=8, batch_size=2)).run(reqs)
        outs.append([r.out for r in reqs])
    return outs


@pytest.mark.parametrize("family,fmt", [("mixtral", "fp8-static"), ("qwen3_moe", "fp8-dynamic"), ("llama", "block")])
def test_speculative_greedy_equals_plain_decoding_of_the_fp8_target(fp8_dir, family, fmt):
    """Each format's fp8 target, a self-speculative draft (its own first layer, fp8 too): the
    verified output is the fp8 target's own greedy output, token for token."""
    target = ResidentModel.from_source(Checkpoint(fp8_dir(family, fmt)))
    draft = ResidentModel(target.spec.with_layers(1), target.glob, target.layers[:1])
    plain, spec = _spec_vs_plain(target, draft)
    assert spec == plain


def test_speculative_sampling_follows_the_fp8_targets_distribution(tiny_dir, fp8_dir):
    """Many seeds, one prompt, an fp8 target (compressed-tensors FP8-dynamic) and a bf16 draft
    that often disagrees: the first two emitted tokens follow the fp8 target's own distribution
    (its plain forward pass's softmax), chi-square p > 1e-3 as in test_sampling_distribution."""
    import numpy as np

    from test_sampling_distribution import _chi2

    tgt = ResidentModel.from_source(Checkpoint(fp8_dir("llama", "fp8-dynamic")))
    draft = ResidentModel.from_source(Checkpoint(tiny_dir("llama", seed=1, num_hidden_layers=1, intermediate_size=48)))
    prompt, N = [1, 5, 7, 9], 3000
    reqs = [Request(i, prompt, SamplingParams(max_tokens=2, temperature=1.0, seed=1000 + i, ignore_eos=True))
            for i in range(N)]
    stats = Generator(ReferenceBackend(tgt, draft), RunConfig(schedule="single", k=3, batch_size=N)).run(reqs)
    assert 0 < stats.accepted < stats.proposed
    first, second = np.array([r.out[0] for r in reqs]), np.array([r.out[1] for r in reqs])

    def probs(tokens):
        logits = tgt.forward(tgt.new_cache(1, 16), torch.tensor(tokens), torch.tensor([len(tokens)]))
        return torch.softmax(logits[0].double(), -1).numpy()

    assert _chi2(first, probs(prompt)) > 1e-3
    t1 = int(np.bincount(first).argmax())
    sel = first == t1
    assert sel.sum() > 300 and _chi2(second[sel], probs(prompt + [t1])) > 1e-3


@pytest.mark.parametrize("fmt", ["fp8-dynamic", "block"])
def test_an_fp8_head_is_widened_with_its_scale(fp8_dir, tmp_path, fmt):
    """A format that quantized the LM head too: the head is read back as its fp8 values times
    its scale, in the model's dtype (it runs resident)."""
    import shutil

    from fp8_checkpoints import dequantize, quantize_tensor
    from safetensors.torch import load_file, save_file

    d = tmp_path / "head"
    shutil.copytree(fp8_dir("llama", fmt), d)
    f = sorted(d.glob("*.safetensors"))[0]
    tensors = load_file(str(f))
    assert "lm_head.weight" in tensors  # the tiny llama's head is its own tensor
    scheme = "block" if fmt == "block" else "channel"
    q, s = quantize_tensor(tensors["lm_head.weight"], scheme)
    tensors["lm_head.weight"], tensors["lm_head" + (".weight_scale_inv" if fmt == "block" else ".weight_scale")] = q, s
    save_file(tensors, str(f), metadata={"format": "pt"})
    ck = Checkpoint(d)
    head = ck.read_globals()["head"]
    assert head.dtype == ck.dtype
    torch.testing.assert_close(head.float(), dequantize(q, s, scheme).to(ck.dtype).float())
