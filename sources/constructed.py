"""Constructed draft/target pairs whose agreement is a parameter, for benchmarks at scale.

Random weights make a draft and a target that never agree. Here both models share a
random embedding table E (rows of norm sqrt(H), so RMSNorm keeps them) and their heads
map a token x to a "next token": the target's head scores E[x] highest at g(x), the
draft's at g_d(x), where g_d equals g on a random fraction `agreement` of the vocabulary.
The decoder layers are random with small output projections, so they add real work and a
little noise to the residual stream without erasing the structure. The acceptance a run
reports therefore comes from the models' own forward passes and the verifier's real
comparison; nothing skips it.

Weights are filled from a shared random pool (tiled), so 93 GB of layers take seconds,
not the minutes the CPU generator would need.
"""

from __future__ import annotations

import torch

from ..models.layers import OUT_KEYS, is_norm, layer_shapes
from ..models.spec import ModelSpec

_POOL = 1 << 24


class _Pool:
    def __init__(self, seed: int, dtype):
        g = torch.Generator().manual_seed(seed)
        self.base = torch.randn(_POOL, generator=g)
        self.dtype, self.g, self.scaled = dtype, g, {}

    def take(self, shape, std: float) -> torch.Tensor:
        if std not in self.scaled:
            self.scaled[std] = (self.base * std).to(self.dtype)
        pool = self.scaled[std]
        n = 1
        for s in shape:
            n *= s
        out = torch.empty(n, dtype=self.dtype)
        off, filled = int(torch.randint(0, _POOL, (1,), generator=self.g)), 0
        while filled < n:  # one pass of copies, no temporaries
            m = min(n - filled, _POOL - off)
            out[filled: filled + m].copy_(pool[off: off + m])
            filled, off = filled + m, 0
        return out.view(shape)


class ConstructedModel:
    """A weight source (read_layer / read_globals) for one side of a constructed pair."""

    def __init__(self, spec: ModelSpec, perm_seed: int, agreement: float, is_draft: bool, seed: int = 0,
                 layer_std: float = 0.02, out_std: float = 1e-4):
        self.spec, self.dtype = spec, spec.torch_dtype
        self.perm_seed, self.agreement, self.is_draft = perm_seed, agreement, is_draft
        self.seed, self.layer_std, self.out_std = seed, layer_std, out_std

    def next_tokens(self) -> torch.Tensor:
        """[V]: the token this model's head favours after each token (its greedy chain)."""
        return self._next_token_map()

    def _next_token_map(self) -> torch.Tensor:
        V = self.spec.vocab_size
        g = torch.Generator().manual_seed(self.perm_seed)
        target_map = torch.randperm(V, generator=g)
        if not self.is_draft:
            return target_map
        disagree = torch.randperm(V, generator=g)[: int(round(V * (1 - self.agreement)))]
        # Rotate the disagreeing tokens' targets among themselves: still a permutation, and
        # every one of them now predicts a different token than the target does.
        shifted = target_map.clone()
        if len(disagree) > 1:
            shifted[disagree] = target_map[disagree.roll(1)]
        return shifted

    def read_globals(self) -> dict:
        V, H = self.spec.vocab_size, self.spec.hidden_size
        g = torch.Generator().manual_seed(self.perm_seed + 1)
        E = torch.randn(V, H, generator=g)
        E = E / E.norm(dim=1, keepdim=True) * H ** 0.5
        nxt = self._next_token_map()
        head = torch.empty_like(E)
        head[nxt] = E / H ** 0.5  # row nxt[x] is E[x]: logits peak at nxt[x] for input x
        dt = self.dtype
        return {"embed": E.to(dt), "norm": torch.ones(H, dtype=dt), "head": head.to(dt)}

    def read_layer(self, j: int) -> dict:
        dt = self.dtype
        pool = _Pool(self.seed * 1000 + j + (500 if self.is_draft else 0), dt)

        def tensor(name, shape):
            if is_norm(name):
                return torch.ones(shape, dtype=dt)
            if name.endswith("_bias"):
                return torch.zeros(shape, dtype=dt)
            return pool.take(shape, self.out_std if name in OUT_KEYS else self.layer_std)

        return {name: tensor(name, shape) for name, shape in layer_shapes(self.spec, j).items()}


def mixtral_8x7b(num_layers: int = 32, dtype: str = "bfloat16") -> ModelSpec:
    return ModelSpec(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                     num_layers=num_layers, num_heads=32, num_kv_heads=8, head_dim=128, rms_eps=1e-5,
                     rope_theta=1e6, max_positions=32768, num_experts=8, experts_per_token=2, dtype=dtype,
                     eos_token_ids=(2,))


def mistral_7b(num_layers: int = 32, dtype: str = "bfloat16") -> ModelSpec:
    return ModelSpec(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                     num_layers=num_layers, num_heads=32, num_kv_heads=8, head_dim=128, rms_eps=1e-5,
                     rope_theta=1e6, max_positions=32768, dtype=dtype, eos_token_ids=(2,))


def constructed_pair(target: ModelSpec, draft: ModelSpec, agreement: float, seed: int = 0):
    return (ConstructedModel(target, 7 + seed, agreement, False, seed),
            ConstructedModel(draft, 7 + seed, agreement, True, seed))
