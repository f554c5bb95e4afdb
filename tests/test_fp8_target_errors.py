"""Bad fp8 input is one line: a broken fp8 checkpoint (missing scale, another block size or
scale grid, a quantization method this engine does not read), an unknown --quantize, vLLM's
`quantization` argument."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from specoffload.errors import CheckpointError
from specoffload.llm import LLM
from specoffload.models.checkpoint import Checkpoint


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
