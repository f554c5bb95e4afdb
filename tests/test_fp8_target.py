"""An fp8 target (issue 19): fp8 checkpoints in both formats users download, and a bf16 one
quantized at load, computed from their fp8 bytes; speculation stays lossless against it.

The checkpoints are tiny and written here (tests/fp8_checkpoints.py). transformers reads them
on the CPU: compressed-tensors checkpoints through the `compressed-tensors` package, which
runs each quantized Linear with its input quantized and dequantized the way an fp8 kernel sees
it; block-wise fp8 ones dequantized to full precision at load (transformers' CPU fallback for
that format), inputs unquantized, as ours on that format.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fp8_checkpoints import write_fp8
from hf_reference import PROMPTS
from specoffload.configs.run_config import RunConfig
from specoffload.configs.sampling_params import SamplingParams
from specoffload.errors import CheckpointError
from specoffload.llm import LLM
from specoffload.models.checkpoint import Checkpoint
from specoffload.models.fp8_weights import FP8, Fp8Weight
from specoffload.models.resident import ResidentModel
from specoffload.scheduler.generator import Generator
from specoffload.scheduler.reference_backend import ReferenceBackend
from specoffload.scheduler.request import Request
from specoffload.sources.fp8_quantize import Fp8Quantized

FORMATS = ("fp8-dynamic", "fp8-static", "block")
# Block checkpoints get several 128x128 blocks per matrix. Multiples of 128: transformers'
# CPU dequantize takes the block size as rows // scale rows, wrong for a partial last block
# (real checkpoints have none); ours is checked against partial blocks on its own below.
BLOCK_SHAPES = dict(hidden_size=256, intermediate_size=384)


@pytest.fixture(scope="session")
def fp8_dir(tiny_dir, tmp_path_factory):
    """(family, format) -> an fp8 checkpoint folder made from a tiny bf16 one (made once)."""
    root, made = tmp_path_factory.mktemp("fp8"), {}

    def get(family: str, fmt: str):
        if (family, fmt) not in made:
            over = BLOCK_SHAPES if fmt == "block" else {}
            made[family, fmt] = write_fp8(tiny_dir(family, **over), root / f"{family}-{fmt}", fmt)
        return made[family, fmt]

    return get


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


def _edit(folder, drop=None, config=None, scale_of=None):
    """Break an fp8 checkpoint in place: drop a tensor, change the quantization config, or
    give a block scale a 64x64 grid."""
    f = next(folder.glob("*.safetensors"))
    t = load_file(str(f))
    if drop:
        del t[drop]
    if scale_of:
        w = t[scale_of + ".weight"]
        t[scale_of + ".weight_scale_inv"] = torch.ones(-(-w.shape[0] // 64), -(-w.shape[1] // 64))
    save_file(t, str(f), metadata={"format": "pt"})
    if config:
        cfg = json.loads((folder / "config.json").read_text())
        cfg["quantization_config"].update(config)
        (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("case", ["missing scale", "block size in config", "block scale grid", "gptq"])
def test_bad_fp8_checkpoint_is_one_line(fp8_dir, tmp_path, capsys, case):
    """`specoffload generate` on a broken fp8 checkpoint: exit 2, one error line, no traceback.
    All but the scale grid are found from config.json and the shards' headers, before Ray starts."""
    import shutil

    from specoffload.cli import main

    fmt = "fp8-dynamic" if case == "missing scale" else "block"
    d = shutil.copytree(fp8_dir("llama", fmt), tmp_path / "bad")
    if case == "missing scale":
        _edit(d, drop="model.layers.1.self_attn.k_proj.weight_scale")
        want = "tensor model.layers.1.self_attn.k_proj.weight is fp8 but has no scale"
    elif case == "block size in config":
        _edit(d, config={"weight_block_size": [64, 64]})
        want = "weight_block_size [64, 64] is not supported"
    elif case == "block scale grid":
        _edit(d, scale_of="model.layers.0.mlp.up_proj")
        want = "128x128 blocks"
    else:
        _edit(d, config={"quant_method": "gptq"})
        want = "quantization 'gptq' is not supported"
    if case != "block scale grid":
        with pytest.raises(CheckpointError, match=want.replace("[", r"\[").replace("]", r"\]")):
            Checkpoint(d)
    rc = main(["generate", "--model", str(d), "--engine", "reference", "--quiet", "--prompt", "w3 w4",
               "--max-tokens", "2"])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2 and "Traceback" not in err, err
    assert lines[-1].startswith("specoffload: error: ") and want in lines[-1], err
    assert [x for x in lines if "error" in x] == [lines[-1]]

# -- on the GPU (scripts/gpu_check.py runs these: pytest -m cuda) -------------------------------
import gpu  # noqa: E402  (tests/ is on sys.path: conftest.py)

cuda_only = gpu.cuda_only("fp8 kernels need a GPU")


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
    speculative output equals plain decoding of the same target on the same GPU, and the
    loader's files hold the fp8 bytes (about half of what bf16 takes)."""
    d = fp8_dir(family, fmt)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    sp = SamplingParams(max_tokens=16, ignore_eos=True)
    outs = []
    for draft in (None, "self:1"):
        with LLM(str(d), draft=draft, device="cuda", dtype="bfloat16", k=3, batch_size=2, progress=False) as llm:
            outs.append([o.outputs[0].token_ids for o in llm.generate(prompts, sp)])
    assert outs[0] == outs[1]


def test_unknown_quantize_is_one_line(tiny_dir):
    from specoffload.errors import ConfigError

    with pytest.raises(ConfigError, match="quantize must be one of fp8 or None, got 'int4'"):
        LLM(str(tiny_dir("llama")), engine="reference", quantize="int4", progress=False)


def test_vllm_quantization_argument(tiny_dir):
    """vLLM's `quantization="fp8"` is --quantize fp8; another method is one line."""
    from specoffload.errors import ConfigError
    from specoffload.vllm import LLM as VLLM

    llm = VLLM(model=str(tiny_dir("llama")), quantization="fp8", engine="reference", start=False, progress=False)
    assert llm.args.quantize == "fp8" and llm.spec.weights == "fp8"
    with pytest.raises(ConfigError, match="quantization='awq' is not supported"):
        VLLM(model=str(tiny_dir("llama")), quantization="awq", engine="reference", start=False)
