"""A draft's weight matrices stored in fp8 (e4m3) with one scale per output row.

Why: on W1 the draft (a Mistral-7B shape, 14 GB in bf16) takes over half of the 24 GiB the
GPU is allowed; in fp8 it takes half that, and the memory freed holds more weight slots, which
load the next pass's layers while the draft runs (W1 run 16: 1.78 s per round against 1.94). Only the draft is quantized: the target verifies
every token in its own dtype, so output stays the target's exactly; what fp8 can change is
how often the draft agrees (measure it: scripts/measure_acceptance.py --draft-fp8).

A matmul quantizes its input per row (token) to fp8 as well and runs `torch._scaled_mm`
(fp8 tensor cores on Hopper; torch's CPU build emulates it, correct but ~100x slower than
bf16), scales applied in the kernel, bf16 out. Where the kernel refuses the shapes or dtypes, the weight is widened and
scaled instead (same values, more memory traffic), once per refusal kind.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
# Matrices of a dense layer that are quantized (norms, biases and MoE experts stay as they are).
DENSE_MATRICES = ("q", "k", "v", "o", "gate", "up", "down")
# Matrices that read the same input are stored as one (rows stacked; each row keeps its own
# scale, so the values are those of quantizing them apart): one input quantization and one
# matmul instead of three or two. At batch 192 the draft step is bound by kernel count, not
# bytes (H200, profile_draft: fp8 matrices one by one took 23.3 ms per step, bf16 18.3).
FUSED = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}

# Why a self:N draft cannot be fp8 (LLM checks early; the executor again, for other callers).
SELF_DRAFT_REFUSAL = ("draft_fp8 needs a separate draft checkpoint: a self:N draft is the target's own layers, "
                      "which must stay as they are")

# (device type, input dtype) where _scaled_mm raised once: widened weights from then on.
_SCALED_MM_FAILED: set = set()


class Fp8Weight:
    """A [out, in] matrix as fp8 values and fp32 per-row scales (w ~= data * scale[:, None])."""

    def __init__(self, data: torch.Tensor, scale: torch.Tensor):
        self.data, self.scale = data, scale
        self.scale_row = scale[None, :].contiguous()  # [1, out], the layout _scaled_mm takes

    @classmethod
    def quantize(cls, w: torch.Tensor, chunk_rows: int = 1024) -> "Fp8Weight":
        """Rows a chunk at a time: the fp32 temporaries of a whole matrix (4x its fp8 size)
        would be the load's memory peak on a GPU that the draft nearly fills."""
        data = torch.empty(w.shape, dtype=FP8, device=w.device)
        scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
        for lo in range(0, w.shape[0], chunk_rows):
            wf = w[lo:lo + chunk_rows].float()
            s = (wf.abs().amax(dim=1) / FP8_MAX).clamp_min(1e-12)
            data[lo:lo + chunk_rows] = (wf / s[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
            scale[lo:lo + chunk_rows] = s
        return cls(data, scale)

    @classmethod
    def stacked(cls, parts: list["Fp8Weight"]) -> "Fp8Weight":
        """Matrices quantized apart, stacked by rows (each row keeps its own scale)."""
        return cls(torch.cat([p.data for p in parts]), torch.cat([p.scale for p in parts]))

    @property
    def shape(self):
        return self.data.shape

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * 4

    def dequantize(self, dtype) -> torch.Tensor:
        return (self.data.float() * self.scale[:, None]).to(dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., in] -> [..., out] in x's dtype."""
        key = (x.device.type, x.dtype)
        if key not in _SCALED_MM_FAILED:
            try:
                y = self._scaled(x)
                return y if bias is None else y + bias
            except torch.OutOfMemoryError:
                raise  # not a refusal: widening would need more memory still
            except (RuntimeError, NotImplementedError, TypeError):
                _SCALED_MM_FAILED.add(key)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        # Few kernels: |x| max per row in one reduction, fp32 out. x / sx stays within
        # FP8_MAX up to rounding that e4m3 rounds back to it, so no clamp is needed.
        amax = torch.linalg.vector_norm(x2, ord=float("inf"), dim=1, keepdim=True, dtype=torch.float32)
        sx = (amax * (1.0 / FP8_MAX)).clamp_min_(1e-12)  # [M, 1]
        xq = (x2 / sx).to(FP8)
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        y = torch._scaled_mm(xq, self.data.t(), scale_a=sx, scale_b=self.scale_row, out_dtype=out_dtype)
        return y.to(x.dtype).reshape(*shape[:-1], y.shape[-1])

    def to(self, device, non_blocking: bool = False) -> "Fp8Weight":
        return Fp8Weight(self.data.to(device, non_blocking=non_blocking),
                         self.scale.to(device, non_blocking=non_blocking))


def quantize_layer(w: dict) -> dict:
    """A layer's dict with its dense matrices in fp8 (those sharing an input stacked as one,
    see FUSED); everything else as it was."""
    out = dict(w)
    for fused, parts in FUSED.items():
        if all(isinstance(w.get(p), torch.Tensor) for p in parts):
            # Per part, then stacked: the same values as quantizing the stack, without a
            # bf16 copy of it. Each part's checkpoint tensor is dropped once quantized.
            q = []
            for p in parts:
                q.append(Fp8Weight.quantize(out.pop(p)))
            out[fused] = Fp8Weight.stacked(q)
    return {k: Fp8Weight.quantize(v) if k in DENSE_MATRICES and isinstance(v, torch.Tensor) and v.dim() == 2 else v
            for k, v in out.items()}


def layer_nbytes(w: dict) -> int:
    return sum(v.nbytes() if isinstance(v, Fp8Weight) else v.numel() * v.element_size() for v in w.values())
