"""The two fp8 checkpoint formats users download, read into our fp8 layout (models/fp8_weights.py).

- compressed-tensors ("FP8", "FP8-dynamic"; `quantization_config.quant_method ==
  "compressed-tensors"`, format "float-quantized"): e4m3 `weight` with a `weight_scale` per
  output channel ([out, 1]) or per tensor ([1]), inputs quantized per token at run time or by
  a static per-tensor `input_scale`. Modules in `ignore` are stored in bf16.
- block-wise fp8 (`quant_method: "fp8"`, Qwen3's and DeepSeek's releases): e4m3 `weight` with
  a `weight_scale_inv` per 128x128 block (despite the name, the factor that dequantizes).
  Modules in `modules_to_not_convert` are stored in bf16.

A module whose weight is stored fp8 must have its scale; a scale of the wrong shape (another
block size) is a one-line CheckpointError naming the tensor, like any other bad tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import CheckpointError
from .fp8_weights import BLOCK, FP8, INPUT_SCALE, SCALE

# Checkpoint suffix of a scale tensor -> the suffix our flat layout gives it.
SCALE_SUFFIXES = {".weight_scale": SCALE, ".weight_scale_inv": SCALE, ".input_scale": INPUT_SCALE}
# Symmetric schemes save zero points of 0 (older compressed-tensors versions): nothing to read.
SKIPPED_SUFFIXES = (".weight_zero_point", ".input_zero_point")


@dataclass(frozen=True)
class Fp8Format:
    method: str  # "compressed-tensors" or "fp8" (block-wise)
    where: str = ""  # the config file, for errors

    def __post_init__(self):
        if self.method not in ("compressed-tensors", "fp8"):
            raise CheckpointError(f"{self.where}: unknown fp8 format {self.method!r}")

    @classmethod
    def of(cls, where, qc: dict | None) -> "Fp8Format | None":
        """The format a config.json's `quantization_config` names (None: not quantized), or a
        one-line CheckpointError for a quantization this engine does not read."""
        if not qc:
            return None
        method = qc.get("quant_method")
        if method == "compressed-tensors":
            _check_compressed_tensors(where, qc)
        elif method == "fp8":
            _check_block(where, qc)
        else:
            raise CheckpointError(f"{where}: quantization {method!r} is not supported; fp8 checkpoints "
                                  f"(compressed-tensors FP8 / FP8-dynamic, block-wise fp8) and bf16 ones are")
        return cls(method, str(where))

    def scale(self, where, name: str, data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """A checkpoint's weight scale in our layout: per row [out], or per block for the block format."""
        out, inp = data.shape[-2:]
        s = scale.float()
        if self.method == "fp8":
            want = (-(-out // BLOCK), -(-inp // BLOCK))
            if tuple(s.shape[-2:]) != want or s.dim() != data.dim():
                raise CheckpointError(f"{where}: {name}_scale_inv has shape {list(s.shape)}, 128x128 blocks of "
                                      f"{list(data.shape)} need {list(data.shape[:-2]) + list(want)}")
            return s.contiguous()
        lead = tuple(data.shape[:-2])  # experts: [E]
        if s.numel() == _prod(lead) * out:  # per channel: [out, 1] or [out]
            return s.reshape(*lead, out).contiguous()
        if s.numel() == _prod(lead):  # per tensor: one scale for every row
            return s.reshape(*lead, 1).expand(*lead, out).contiguous()
        raise CheckpointError(f"{where}: {name}_scale has shape {list(s.shape)}: neither one per output channel "
                              f"({out}) nor one per tensor")


def _prod(xs) -> int:
    n = 1
    for x in xs:
        n *= x
    return n


def _check_block(where, qc: dict):
    bs = qc.get("weight_block_size")
    if list(bs or []) != [BLOCK, BLOCK]:
        raise CheckpointError(f"{where}: weight_block_size {bs} is not supported; block-wise fp8 needs "
                              f"[{BLOCK}, {BLOCK}]")
    if qc.get("fmt", "e4m3") != "e4m3" or qc.get("activation_scheme", "dynamic") != "dynamic":
        raise CheckpointError(f"{where}: block-wise fp8 with fmt {qc.get('fmt')!r} and activation_scheme "
                              f"{qc.get('activation_scheme')!r} is not supported (e4m3, dynamic)")


def _check_compressed_tensors(where, qc: dict):
    fmt = qc.get("format")
    if fmt not in ("float-quantized", "naive-quantized"):
        raise CheckpointError(f"{where}: compressed-tensors format {fmt!r} is not supported; fp8 checkpoints "
                              f"(float-quantized) are")
    for name, g in (qc.get("config_groups") or {}).items():
        w, a = g.get("weights") or {}, g.get("input_activations")
        if (w.get("type"), w.get("num_bits"), w.get("strategy")) not in (("float", 8, "channel"), ("float", 8, "tensor")) \
                or w.get("symmetric") is False or w.get("dynamic"):
            raise CheckpointError(f"{where}: compressed-tensors group {name!r} weights {w} are not fp8 per channel "
                                  f"or per tensor")
        if a and ((a.get("type"), a.get("num_bits")) != ("float", 8) or
                  (a.get("strategy"), bool(a.get("dynamic"))) not in (("token", True), ("tensor", False))):
            raise CheckpointError(f"{where}: compressed-tensors group {name!r} input activations {a} are not fp8 "
                                  f"dynamic per token or static per tensor")


def check_finite_fp8(where, name: str, t: torch.Tensor):
    """e4m3fn has no infinities; NaN is every exponent and mantissa bit set (0x7f / 0xff).
    Checked on the bytes, by two reductions: 0x7f is the largest int8 and 0xff the largest
    uint8, so no temporary is made (the mask-and-compare form read 0.58 GB/s with one torch
    thread on the dev machine, these 12 GB/s), and a float copy would be 4x the layer."""
    if t.dtype == FP8 and t.numel() and (int(t.view(torch.int8).max()) == 0x7F
                                         or int(t.view(torch.uint8).max()) == 0xFF):
        raise CheckpointError(f"{where}: tensor {name} holds NaN values")
