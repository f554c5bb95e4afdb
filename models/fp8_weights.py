"""Weight matrices stored in fp8 (e4m3) with fp32 scales: the draft's (`--draft-fp8`) and the
target's (fp8 checkpoints, `--quantize fp8`).

Why: the target's pass is bound by the weight copy (W1: 93 GB of bf16 per pass); in fp8 it is
half the bytes, over PCIe and in host memory. The draft (a Mistral-7B shape, 14 GB in bf16)
takes over half of W1's 24 GiB GPU cap; in fp8 it takes half that, and the memory freed holds
more weight slots. An fp8 target's output is that fp8 model's own: speculation stays lossless
against it (the draft proposes, the fp8 target verifies).

Scales come in two layouts: one per output row (`scale` [..., out]: our own quantization and
compressed-tensors' per-channel or per-tensor scales, expanded), or one per 128x128 block
(`scale` [..., ceil(out/128), ceil(in/128)]: the `quant_method: fp8` block format of Qwen3's and
DeepSeek's releases). Experts are stacked [E, out, in] with scales [E, ...], as bf16 ones are.

The input of a row-scaled matmul is quantized to fp8 as well (per token, or by a checkpoint's
static `input_scale`) and on CUDA runs `torch._scaled_mm` (fp8 tensor cores), scales applied in
the kernel, bf16 out. Block-scaled weights, or a shape or dtype the kernel refuses, are widened
to bf16 on the GPU (a blocked view, no fp32 copy). On the CPU the dequantize path runs: the
input quantized and dequantized the same way (so it sees what the kernel sees), the weight
widened and scaled, one fp32 matmul. That path is the reference the tests compare against
transformers.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
BLOCK = 128  # the block format's only block size (weight_block_size [128, 128])
# Matrices of a dense layer that the draft quantizes (norms, biases and MoE experts stay as they are).
DENSE_MATRICES = ("q", "k", "v", "o", "gate", "up", "down")
# Matrices that read the same input are stored as one (rows stacked; each row keeps its own
# scale, so the values are those of quantizing them apart): one input quantization and one
# matmul instead of three or two. At batch 192 the draft step is bound by kernel count, not
# bytes (H200, profile_draft: fp8 matrices one by one took 23.3 ms per step, bf16 18.3).
FUSED = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}
# How an fp8 matrix travels in a flat layer dict (host memory, /dev/shm files, weight slots):
# its name holds the fp8 values, name + SCALE its scales, name + INPUT_SCALE a static input scale.
SCALE, INPUT_SCALE = ".scale", ".input_scale"

# Why a self:N draft cannot be fp8 (LLM checks early; the executor again, for other callers).
SELF_DRAFT_REFUSAL = ("draft_fp8 needs a separate draft checkpoint: a self:N draft is the target's own layers, "
                      "which must stay as they are")

# (device type, input dtype) where _scaled_mm raised once -> its error: widened weights from then on.
_SCALED_MM_FAILED: dict = {}
# Device types where a division could not write fp8 (div_into_fp8): the two steps from then on.
_DIV_INTO_FP8_FAILED: set = set()


def div_into_fp8(x2: torch.Tensor, sx: torch.Tensor) -> torch.Tensor:
    """(x2 / sx).to(fp8) in one kernel: the quotient is computed in fp32 either way and rounded
    to fp8 once, so the values are the same, without the fp32 [M, in] tensor in between (W4's
    FFN input in prefill: 940 MB written and read again). On CUDA only: on a CPU it is slower."""
    return torch.div(x2, sx, out=torch.empty(x2.shape, dtype=FP8, device=x2.device))


def per_token_scales(x2: torch.Tensor) -> torch.Tensor:
    """[M, 1] fp32 scales quantizing each row of x2 [M, in] by its own max (models/fused.py
    makes the same in its fused kernels). Few kernels: |x| max per row in one reduction, fp32 out."""
    amax = torch.linalg.vector_norm(x2, ord=float("inf"), dim=1, keepdim=True, dtype=torch.float32)
    return (amax * (1.0 / FP8_MAX)).clamp_min_(1e-12)


class Fp8Weight:
    """A [out, in] matrix (or experts stacked [E, out, in]) as fp8 values and fp32 scales,
    w ~= data * scale per row, or per 128x128 block where `scale` has as many dims as `data`.
    `input_scale`: a static per-tensor input scale ([1], experts [E]); None quantizes each
    input row (token) by its own max. Block-scaled weights leave inputs as they are."""

    def __init__(self, data: torch.Tensor, scale: torch.Tensor, input_scale: torch.Tensor | None = None):
        self.data, self.scale, self.input_scale = data, scale, input_scale
        self.block = scale.dim() == data.dim()
        self.scale_row = None if self.block else scale.unsqueeze(-2)  # [.., 1, out], the layout _scaled_mm takes

    @classmethod
    def quantize(cls, w: torch.Tensor, chunk_rows: int = 1024) -> "Fp8Weight":
        """Per output row (experts: per expert and row), rows a chunk at a time: the fp32
        temporaries of a whole matrix (4x its fp8 size) would be the load's memory peak."""
        rows = w.reshape(-1, w.shape[-1])
        data = torch.empty(rows.shape, dtype=FP8, device=w.device)
        scale = torch.empty(rows.shape[0], dtype=torch.float32, device=w.device)
        for lo in range(0, rows.shape[0], chunk_rows):
            # In place, one fp32 temporary: the loader quantizes a whole target this way (--quantize fp8).
            part = rows[lo:lo + chunk_rows]
            # max |w| as max(max, -min): exact, and far cheaper on a CPU than an inf-norm reduction
            s = torch.maximum(part.amax(1), part.amin(1).neg()).float().div_(FP8_MAX).clamp_min_(1e-12)
            data[lo:lo + chunk_rows] = part.to(torch.float32, copy=True).div_(s[:, None]).clamp_(-FP8_MAX, FP8_MAX)
            scale[lo:lo + chunk_rows] = s
        return cls(data.view(w.shape), scale.view(w.shape[:-1]))

    @classmethod
    def stacked(cls, parts: list["Fp8Weight"]) -> "Fp8Weight":
        """Row-scaled matrices quantized apart, stacked by rows (each row keeps its own scale)."""
        return cls(torch.cat([p.data for p in parts]), torch.cat([p.scale for p in parts]))

    @property
    def shape(self):
        return self.data.shape

    def __getitem__(self, e: int) -> "Fp8Weight":
        """Expert e of a stacked [E, out, in] weight."""
        s = self.input_scale
        return Fp8Weight(self.data[e], self.scale[e], None if s is None else s[e:e + 1])

    def flat(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors a flat layer dict holds for this matrix (see SCALE)."""
        out = {name: self.data, name + SCALE: self.scale}
        if self.input_scale is not None:
            out[name + INPUT_SCALE] = self.input_scale
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.flat("w").values())

    def full_scale(self) -> torch.Tensor:
        """The scale of every element's row or block, broadcastable against `data` (fp32)."""
        if not self.block:
            return self.scale[..., None]
        out, inp = self.data.shape[-2:]
        return self.scale.repeat_interleave(BLOCK, -2)[..., :out, :].repeat_interleave(BLOCK, -1)[..., :inp]

    def dequantize(self, dtype) -> torch.Tensor:
        """The widened matrix. In fp32: exact products (the reference). In a 16-bit dtype (a
        GPU's widening): no fp32 copy of the matrix, whole blocks scaled through a blocked view."""
        *lead, out, inp = self.data.shape
        if dtype == torch.float32 or (self.block and (out % BLOCK or inp % BLOCK)):
            return (self.data.float() * self.full_scale()).to(dtype)
        if not self.block:
            return self.data.to(dtype) * self.scale.to(dtype)[..., None]
        blocks = self.data.view(*lead, out // BLOCK, BLOCK, inp // BLOCK, BLOCK).to(dtype)
        return (blocks * self.scale.to(dtype)[..., :, None, :, None]).view(*lead, out, inp)

    def input_scales(self, x2: torch.Tensor, expert_of_row: torch.Tensor | None = None) -> torch.Tensor | None:
        """[M, 1] fp32 scales that quantize the rows of x2 [M, in] (None: inputs stay as they are).
        `expert_of_row`: for stacked experts with static scales, the expert each row goes to."""
        if self.block:
            return None
        if self.input_scale is None:
            return per_token_scales(x2)
        s = self.input_scale.float().reshape(-1)
        s = s[expert_of_row] if expert_of_row is not None and s.numel() > 1 else s[:1].expand(x2.shape[0])
        return s.reshape(-1, 1).contiguous()  # _scaled_mm takes rowwise scales, materialised

    def quantize_input(self, x2: torch.Tensor, sx: torch.Tensor) -> torch.Tensor:
        # x / sx stays within FP8_MAX for per-token scales up to rounding; a static scale can overflow.
        if self.input_scale is None and x2.is_cuda and "cuda" not in _DIV_INTO_FP8_FAILED:
            try:
                return div_into_fp8(x2, sx)
            except torch.OutOfMemoryError:
                raise
            except (RuntimeError, TypeError):  # a build whose division cannot write fp8
                _DIV_INTO_FP8_FAILED.add("cuda")
        q = x2 / sx
        return (q if self.input_scale is None else q.clamp(-FP8_MAX, FP8_MAX)).to(FP8)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None, shared: "SharedInput | None" = None
               ) -> torch.Tensor:
        """x [..., in] -> [..., out] in x's dtype. shared: x as other matrices reading it have
        quantized it (see SharedInput)."""
        key = (x.device.type, x.dtype)
        if x.device.type != "cuda":
            return self.reference_linear(x, bias, shared)
        if not self.block and key not in _SCALED_MM_FAILED:
            try:
                y = self._scaled(x, shared)
                return y if bias is None else y + bias
            except torch.OutOfMemoryError:
                raise  # not a refusal: widening would need more memory still
            except (RuntimeError, NotImplementedError, TypeError) as e:
                # Widening every matrix on every call is several times slower: say so, once.
                _SCALED_MM_FAILED[key] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
                warnings.warn(f"torch._scaled_mm refused {key[1]} inputs on {key[0]}, fp8 matrices widen from now on "
                              f"({_SCALED_MM_FAILED[key]})", stacklevel=2)
        # Block scales (no fp8 kernel for them here), or a refusal: widened in x's dtype.
        xq, sx = self._quantized(x.reshape(-1, x.shape[-1]), shared)
        if sx is not None:
            x = (xq.to(x.dtype) * sx.to(x.dtype)).reshape(x.shape)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def reference_linear(self, x: torch.Tensor, bias: torch.Tensor | None = None,
                         shared: "SharedInput | None" = None) -> torch.Tensor:
        """The dequantize path: what the fp8 kernel computes, in fp32 (see the module's docstring)."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xq, sx = self._quantized(x2, shared)
        xf = x2.float() if sx is None else xq.float() * sx
        y = F.linear(xf, self.dequantize(torch.float32), None if bias is None else bias.float())
        return y.to(x.dtype).reshape(*shape[:-1], y.shape[-1])

    def _quantized(self, x2: torch.Tensor, shared: "SharedInput | None"):
        """(x2 in fp8, its [M, 1] scales), or (None, None) where inputs stay as they are."""
        if shared is not None and self.input_scale is None and not self.block:
            return shared.per_token(self, x2)
        sx = self.input_scales(x2)
        return (None, None) if sx is None else (self.quantize_input(x2, sx), sx)

    def _scaled(self, x: torch.Tensor, shared: "SharedInput | None" = None) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xq, sx = self._quantized(x2, shared)
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        y = torch._scaled_mm(xq, self.data.t(), scale_a=sx, scale_b=self.scale_row, out_dtype=out_dtype)
        return y.to(x.dtype).reshape(*shape[:-1], y.shape[-1])

    def grouped(self, xs: torch.Tensor, offs: torch.Tensor, expert_of_row: torch.Tensor | None) -> torch.Tensor:
        """Stacked experts: rows of xs [pairs, in] sorted by expert, group ends `offs` ->
        [pairs, out]. CUDA: one fp8 grouped matmul (a refusal raises: the MoE layer then runs
        its loop over experts, one fp8 matmul each, rather than widening every expert per
        chunk); elsewhere the experts widened, the reference."""
        sx = self.input_scales(xs, expert_of_row)
        if xs.device.type == "cuda" and self.block:  # widened in bf16, every expert of the chunk
            return torch._grouped_mm(xs, self.dequantize(xs.dtype).transpose(-2, -1), offs=offs)
        if xs.device.type == "cuda":
            return torch._scaled_grouped_mm(self.quantize_input(xs, sx), self.data.transpose(-2, -1),
                                            scale_a=sx.reshape(-1), scale_b=self.scale, offs=offs,
                                            out_dtype=torch.bfloat16).to(xs.dtype)
        xf = xs.float() if sx is None else self.quantize_input(xs, sx).float() * sx
        return torch._grouped_mm(xf, self.dequantize(torch.float32).transpose(-2, -1), offs=offs).to(xs.dtype)

    def to(self, device, non_blocking: bool = False) -> "Fp8Weight":
        mv = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Fp8Weight(mv(self.data), mv(self.scale), mv(self.input_scale))


SHARE_INPUTS = True  # False: each matrix quantizes its input itself (profile_prefill_layer --before)


class SharedInput:
    """One input read by several matrices (q, k and v; gate and up). Where they are row-scaled
    fp8 with per-token input scales, the input is quantized once for all of them: the values
    each would make of it alone, since neither its scales nor its fp8 copy depend on the
    matrix. A W4 prefill layer (8,192 tokens) quantized its input three times for q/k/v and
    twice for gate/up; kernels other than its matmuls took 9.4 of its 21.7 ms on the GPU
    (scripts/profile_prefill_layer.py, docs/benchmarks.md, session 20)."""

    def __init__(self):
        self._q = None  # (fp8 copy, [M, 1] scales) of the input, once a matrix asked

    @classmethod
    def of(cls, xq: torch.Tensor, sx: torch.Tensor) -> "SharedInput":
        """An input already quantized per token, as `Fp8Weight._quantized` would (models/fused.py
        makes it in the kernel that makes the input)."""
        shared = cls()
        shared._q = (xq, sx)
        return shared

    def rows(self, lo: int, hi: int) -> "SharedInput":
        """Rows [lo, hi) of the input (a dense FFN's chunk): the quantized rows if made, else a
        fresh SharedInput (per-token quantization is row by row, so the values are the same)."""
        if self._q is None:
            return SharedInput()
        # The scales copied: a row slice of them starts 4 * lo bytes in, and _scaled_mm wants
        # its scale pointers as aligned as a fresh tensor's (the eager path makes fresh ones).
        return SharedInput.of(self._q[0][lo:hi], self._q[1][lo:hi].clone())

    def per_token(self, w: Fp8Weight, x2: torch.Tensor):
        """x2 [M, in] quantized per token; one SharedInput serves one input only."""
        if self._q is None or not SHARE_INPUTS:
            self._q = w._quantized(x2, None)
        return self._q


def gathered(w: dict) -> dict:
    """A flat layer dict with each fp8 matrix and its scales (see SCALE) as one Fp8Weight;
    a dict without fp8 matrices is returned as it is."""
    if not any(k.endswith(SCALE) for k in w):
        return w
    out = {}
    for k, v in w.items():
        if k.endswith(SCALE) or k.endswith(INPUT_SCALE):
            continue
        s = w.get(k + SCALE)
        out[k] = v if s is None else Fp8Weight(v, s, w.get(k + INPUT_SCALE))
    return out


def flattened(w: dict) -> dict:
    """The inverse of `gathered`: Fp8Weight values as their flat tensors (to write to host memory)."""
    out = {}
    for k, v in w.items():
        out.update(v.flat(k) if isinstance(v, Fp8Weight) else {k: v})
    return out


def quantize_layer(w: dict) -> dict:
    """A draft layer's dict with its dense matrices in fp8 (those sharing an input stacked as
    one, see FUSED); matrices already fp8 (an fp8 checkpoint) and everything else as they were."""
    out = dict(gathered(w))
    for fused, parts in FUSED.items():
        if all(isinstance(out.get(p), torch.Tensor) for p in parts):
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
