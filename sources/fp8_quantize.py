"""Quantize at load (`--quantize fp8`): a bf16 source whose layers come out in fp8.

Each layer's matrices are quantized per output row (experts: per expert and row, inputs per
token at run time: models/fp8_weights.py) as the loader reads the layer, before it writes host
memory, so neither disk nor RAM ever holds a second copy of the model: the peak is one layer in
bf16 per loader thread. Norms, router, shared-expert gate, embeddings and head stay as they are.
"""

from __future__ import annotations

from dataclasses import replace

from ..models.fp8_weights import Fp8Weight

# The matrices a target quantizes: attention, dense FFN, routed and shared experts.
TARGET_MATRICES = ("q", "k", "v", "o", "gate", "up", "down", "w_gate", "w_up", "w_down", "s_gate", "s_up", "s_down")
QUANTIZE_CHOICES = ("fp8",)


class Fp8Quantized:
    """The weight-source interface (read_layer / read_globals / spec) over another source."""

    def __init__(self, inner):
        self.inner, self.dtype = inner, inner.dtype
        self.spec = replace(inner.spec, weights="fp8")

    def read_layer(self, j: int) -> dict:
        w = self.inner.read_layer(j)
        if self.inner.spec.weights == "fp8":  # an fp8 checkpoint already: its own scales stand
            return w
        out = {}
        for k in list(w):
            v = w.pop(k)  # the bf16 matrix goes as soon as its fp8 copy exists
            out.update(Fp8Weight.quantize(v).flat(k) if k in TARGET_MATRICES else {k: v})
        return out

    def read_globals(self) -> dict:
        return self.inner.read_globals()


def quantized(source, quantize: str | None):
    """`source`, quantized at load as `quantize` says (None: as it is)."""
    return source if quantize is None else Fp8Quantized(source)
