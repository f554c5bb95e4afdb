"""A layer's elementwise work fused by `torch.compile` (plan.fused_prefill): the norm with the
fp8 quantization of its output (q/k/v's shared input), the residual add with the next norm and
its quantization (gate/up's), RoPE on q and k, and `act(gate) * up` with its quantization for
`down`. Eager torch runs each as several kernels, each reading and writing a [tokens, width]
tensor; fused, each is one or two. W4's prefill sub-batch layer spent ~2.5 of its ~10 ms in
such kernels (docs/benchmarks.md, W4 "Session 32"; `scripts/profile_prefill_fusion.py` times
the groups on a device).

Lossless by construction, not only within a tolerance: the functions fused are `layers`' own,
compiled with inductor's `emulate_precision_casts`, so every intermediate is rounded to its
dtype where eager rounds it, and the quantization is `Fp8Weight`'s per-token one. A group
whose readers do not quantize per token (bf16 matrices, static input scales, block scales)
runs eagerly, as without this. `tests/test_fused.py` holds the fused layer to the eager one
bit for bit on the CPU; on a GPU, reductions may sum in another order.
"""

from __future__ import annotations

import warnings

import torch

from .fp8_weights import FP8, Fp8Weight, SharedInput, per_token_scales
from .layers import activation, apply_rope, rms_norm


def _per_token(x: torch.Tensor):
    """`Fp8Weight.input_scales` and `quantize_input` of a [M, in] input: its scales, and the
    division written as an expression (eager's `div_into_fp8` writes fp8 through `out=`)."""
    sx = per_token_scales(x)
    return (x / sx).to(FP8), sx


def _norm_q(h, weight, eps: float):
    x = rms_norm(h, weight, eps)
    return (x, *_per_token(x))


def _add_norm_q(h, o, weight, eps: float):
    h = h + o
    return (h, *_norm_q(h, weight, eps))


def _rope(q, k, cos, sin):
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def _act_mul_q(act: str, g, u):
    m = activation(act, g) * u
    return (m, *_per_token(m))


def per_token_readers(*ws) -> bool:
    """Whether every matrix reading an input quantizes it per token (row-scaled fp8 without a
    static input scale): only then is one quantization theirs to share."""
    return all(isinstance(w, Fp8Weight) and not w.block and w.input_scale is None for w in ws)


class Fused:
    """The groups, compiled on first use (dynamic shapes: a prefill's token counts vary)."""

    def __init__(self):
        self._compiled = {}
        self.failed: str | None = None  # why compiling failed (then every group runs eagerly)

    def _run(self, fn, *args):
        if self.failed is None:
            c = self._compiled.get(fn)
            if c is None:
                c = self._compiled[fn] = torch.compile(fn, dynamic=True, options={"emulate_precision_casts": True})
            try:
                return c(*args)
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # noqa: BLE001 - a machine that cannot compile (no compiler, no triton)
                # The same values eagerly: a run goes on as if the plan field were off, and
                # says so once. A bad input raises again below, from the eager call.
                self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                warnings.warn(f"plan.fused_prefill: compiling failed, running eagerly ({self.failed})", stacklevel=2)
        return fn(*args)

    def norm_input(self, h, weight, eps: float, readers) -> tuple[torch.Tensor, SharedInput]:
        """rms_norm(h) and its quantization for `readers` (eager where they do not share one)."""
        if not per_token_readers(*readers):
            return rms_norm(h, weight, eps), SharedInput()
        x, xq, sx = self._run(_norm_q, h, weight, eps)
        return x, SharedInput.of(xq, sx)

    def add_norm_input(self, h, o, weight, eps: float, readers):
        """(h + o, its rms_norm, that quantized for `readers`)."""
        if not per_token_readers(*readers):
            h = h + o
            return h, rms_norm(h, weight, eps), SharedInput()
        h, x, xq, sx = self._run(_add_norm_q, h, o, weight, eps)
        return h, x, SharedInput.of(xq, sx)

    def rope(self, q, k, cos, sin):
        return self._run(_rope, q, k, cos, sin)

    def act_mul_input(self, act: str, g, u, reader) -> tuple[torch.Tensor, SharedInput | None]:
        """act(g) * u and its quantization for `reader` (down)."""
        if not per_token_readers(reader):
            return activation(act, g) * u, None
        m, mq, sm = self._run(_act_mul_q, act, g, u)
        return m, SharedInput.of(mq, sm)


FUSED = Fused()  # one per process: compiled graphs are kept across layers and passes
