"""Where weights come from: a checkpoint folder or constructed in memory.

A source is described by a small picklable tuple so actors can open it themselves:
  ("checkpoint", folder, dtype or None)
  ("random", ModelSpec, seed)
"""

from __future__ import annotations

from ..models.checkpoint import Checkpoint
from .random_weights import RandomWeights


def open_source(desc):
    kind = desc[0]
    if kind == "checkpoint":
        return Checkpoint(desc[1], dtype=desc[2])
    if kind == "random":
        return RandomWeights(desc[1], seed=desc[2])
    if kind == "object":  # an already-open source (tests, benchmarks building pairs)
        return desc[1]
    raise ValueError(f"unknown weight source {kind!r}")
