"""Where weights come from: a checkpoint folder or constructed in memory.

A source is described by a small picklable tuple so actors can open it themselves:
  ("checkpoint", folder, dtype or None[, quantize]): quantize "fp8" quantizes it at load
    (sources/fp8_quantize.py)
  ("random", ModelSpec, seed)
"""

from __future__ import annotations

from ..models.checkpoint import Checkpoint
from .random_weights import RandomWeights


def open_source(desc):
    kind = desc[0]
    if kind == "checkpoint":
        from .fp8_quantize import quantized

        return quantized(Checkpoint(desc[1], dtype=desc[2]), desc[3] if len(desc) > 3 else None)
    if kind == "random":
        return RandomWeights(desc[1], seed=desc[2])
    if kind == "object":  # an already-open source (tests, benchmarks building pairs)
        return desc[1]
    raise ValueError(f"unknown weight source {kind!r}")
