"""Tiny fp8 checkpoints in the two formats users download, written from a tiny bf16 one.

compressed-tensors' own scheme presets give the quantization_config (FP8_DYNAMIC: per-channel
weights, dynamic per-token inputs; FP8: per-tensor weights, static per-tensor inputs); the
block format's config is the one Qwen3's fp8 releases carry. Weights are quantized here the way
those tools do (scale = max |w| / 448 per channel, tensor or 128x128 block), so a test knows
exactly which fp8 values the checkpoint holds. Norms, routers and the head stay unquantized.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FP8, MAX, BLOCK = torch.float8_e4m3fn, 448.0, 128
# Linear weights that stay unquantized: routers and the shared expert's gate (ignored by the
# recipes users run), and the head.
_KEEP = ("block_sparse_moe.gate.weight", "mlp.gate.weight", "shared_expert_gate.weight")
STATIC_INPUT_SCALE = 12.0 / MAX  # inputs up to 12 in magnitude fit; the tiny models' stay below


def _quantizable(name: str, t: torch.Tensor) -> bool:
    return (name.startswith("model.layers.") and name.endswith("proj.weight") or ".experts." in name
            and name.endswith(".weight")) and t.dim() == 2 and not name.endswith(_KEEP)


def _q(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (w.float() / scale).clamp(-MAX, MAX).to(FP8)


def quantize_tensor(w: torch.Tensor, scheme: str):
    """(fp8 values, scale as the checkpoint stores it)."""
    w = w.float()
    if scheme == "channel":
        s = (w.abs().amax(dim=1, keepdim=True) / MAX).clamp_min(1e-12)  # [out, 1]
        return _q(w, s), s
    if scheme == "tensor":
        s = (w.abs().amax() / MAX).clamp_min(1e-12).reshape(1)
        return _q(w, s), s
    out, inp = w.shape
    R, C = -(-out // BLOCK), -(-inp // BLOCK)
    pad = torch.zeros(R * BLOCK, C * BLOCK)
    pad[:out, :inp] = w
    blocks = pad.view(R, BLOCK, C, BLOCK)
    s = (blocks.abs().amax(dim=(1, 3)) / MAX).clamp_min(1e-12)  # [R, C]
    q = (blocks / s[:, None, :, None]).clamp(-MAX, MAX).view(R * BLOCK, C * BLOCK)[:out, :inp].to(FP8)
    return q, s


def dequantize(q: torch.Tensor, s: torch.Tensor, scheme: str) -> torch.Tensor:
    if scheme != "block":
        return q.float() * s.reshape(-1, 1) if s.numel() > 1 else q.float() * s
    full = s.repeat_interleave(BLOCK, 0)[: q.shape[0]].repeat_interleave(BLOCK, 1)[:, : q.shape[1]]
    return q.float() * full


def ct_config(preset: str, model_type: str) -> dict:
    """compressed-tensors' own preset, or (where the package is missing: the GPU machine's
    CUDA-only tests need no transformers comparison) the dict that preset gives."""
    ignore = ["lm_head", "re:.*block_sparse_moe.gate$", "re:.*mlp.gate$", "re:.*shared_expert_gate$"]
    try:
        from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
    except ImportError:
        static = preset == "FP8"
        fp8 = {"num_bits": 8, "type": "float", "symmetric": True}
        group = {"targets": ["Linear"], "weights": fp8 | {"strategy": "tensor" if static else "channel", "dynamic": False},
                 "input_activations": fp8 | {"strategy": "tensor" if static else "token", "dynamic": not static}}
        return {"config_groups": {"group_0": group}, "quant_method": "compressed-tensors", "format": "float-quantized",
                "quantization_status": "compressed", "ignore": ignore}
    cfg = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])}, ignore=ignore,
                             format="float-quantized", quantization_status="compressed")
    return cfg.model_dump(exclude_none=True)


BLOCK_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def write_fp8(src: Path, dst: Path, fmt: str, dequantized: Path | None = None) -> Path:
    """src's weights as an fp8 checkpoint in `fmt` ("fp8-dynamic", "fp8-static" or "block") at dst;
    `dequantized`: also the same fp8 values widened back into an unquantized checkpoint there."""
    scheme = {"fp8-dynamic": "channel", "fp8-static": "tensor", "block": "block"}[fmt]
    shutil.copytree(src, dst)
    files = sorted(dst.glob("*.safetensors"))
    assert len(files) == 1, "tiny checkpoints are one shard"
    tensors, plain = load_file(str(files[0])), {}
    out = {}
    for name, t in tensors.items():
        if not _quantizable(name, t):
            out[name], plain[name] = t, t
            continue
        q, s = quantize_tensor(t, scheme)
        base = name[: -len(".weight")]
        out[name], out[base + (".weight_scale_inv" if scheme == "block" else ".weight_scale")] = q, s
        if fmt == "fp8-static":
            out[base + ".input_scale"] = torch.tensor([STATIC_INPUT_SCALE])
        plain[name] = dequantize(q, s, scheme).to(t.dtype)
    save_file(out, str(files[0]), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = BLOCK_CONFIG if scheme == "block" else ct_config(
        "FP8_DYNAMIC" if fmt == "fp8-dynamic" else "FP8", cfg["model_type"])
    (dst / "config.json").write_text(json.dumps(cfg, indent=1))
    if dequantized is not None:
        shutil.copytree(src, dequantized)
        save_file(plain, str(sorted(dequantized.glob("*.safetensors"))[0]), metadata={"format": "pt"})
    return dst
