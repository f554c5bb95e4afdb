"""Random weights for any spec, for benchmarks whose models no disk here holds.

Bytes are drawn on the GPU when there is one (the CPU generator takes minutes over 93 GB)
and copied to wherever the caller wants them.
"""

from __future__ import annotations

import torch

from ..models.layers import is_norm, layer_shapes
from ..models.spec import ModelSpec


def _gen_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _rand(shape, dtype, gen, std, out_device):
    t = torch.empty(shape, dtype=dtype, device=gen.device).normal_(0.0, std, generator=gen)
    return t.to(out_device)


def random_layer(spec: ModelSpec, j: int, seed: int = 0, device="cpu", std: float = 0.02) -> dict:
    gen = torch.Generator(device=_gen_device()).manual_seed(seed * 100_003 + j)
    dt = spec.torch_dtype
    return {name: torch.ones(shape, dtype=dt, device=device) if is_norm(name) else _rand(shape, dt, gen, std, device)
            for name, shape in layer_shapes(spec, j).items()}


def random_globals(spec: ModelSpec, seed: int = 0, device="cpu", std: float = 0.02) -> dict:
    gen = torch.Generator(device=_gen_device()).manual_seed(seed * 100_003 + 99_999)
    dt = spec.torch_dtype
    embed = _rand((spec.vocab_size, spec.hidden_size), dt, gen, std, device)
    head = embed if spec.tie_embeddings else _rand((spec.vocab_size, spec.hidden_size), dt, gen, std, device)
    return {"embed": embed, "norm": torch.ones(spec.hidden_size, dtype=dt, device=device), "head": head}


class RandomWeights:
    """A weight source with the same interface as `Checkpoint`, built in memory."""

    def __init__(self, spec: ModelSpec, seed: int = 0, std: float = 0.02):
        self.spec, self.seed, self.std = spec, seed, std
        self.dtype = spec.torch_dtype

    def read_layer(self, j: int) -> dict:
        return random_layer(self.spec, j, self.seed, std=self.std)

    def read_globals(self) -> dict:
        return random_globals(self.spec, self.seed, std=self.std)
