"""Random weights for any spec, for benchmarks whose models no disk here holds.

Bytes are drawn on the GPU when there is one (the CPU generator takes minutes over 93 GB)
and copied to wherever the caller wants them.
"""

from __future__ import annotations

import torch

from .spec import ModelSpec


def _gen_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _rand(shape, dtype, gen, std, out_device):
    t = torch.empty(shape, dtype=dtype, device=gen.device).normal_(0.0, std, generator=gen)
    return t.to(out_device)


def random_layer(spec: ModelSpec, j: int, seed: int = 0, device="cpu", std: float = 0.02) -> dict:
    gen = torch.Generator(device=_gen_device()).manual_seed(seed * 100_003 + j)
    dt, h, d, I = spec.torch_dtype, spec.hidden_size, spec.head_dim, spec.intermediate_size

    def r(*shape):
        return _rand(shape, dt, gen, std, device)

    w = {
        "ln1": torch.ones(h, dtype=dt, device=device),
        "ln2": torch.ones(h, dtype=dt, device=device),
        "q": r(spec.num_heads * d, h),
        "k": r(spec.num_kv_heads * d, h),
        "v": r(spec.num_kv_heads * d, h),
        "o": r(h, spec.num_heads * d),
    }
    if spec.qkv_bias:
        w |= {"q_bias": r(spec.num_heads * d), "k_bias": r(spec.num_kv_heads * d), "v_bias": r(spec.num_kv_heads * d)}
    if spec.qk_norm:
        w |= {"q_norm": torch.ones(d, dtype=dt, device=device), "k_norm": torch.ones(d, dtype=dt, device=device)}
    if spec.layer_is_moe(j):
        E, I = spec.num_experts, spec.expert_size  # Qwen MoE experts are narrower than its dense FFN
        w |= {"router": r(E, h), "w_gate": r(E, I, h), "w_up": r(E, I, h), "w_down": r(E, h, I)}
        if spec.shared_expert_size:
            S = spec.shared_expert_size
            w |= {"s_gate": r(S, h), "s_up": r(S, h), "s_down": r(h, S), "shared_gate": r(1, h)}
    else:
        w |= {"gate": r(I, h), "up": r(I, h), "down": r(h, I)}
    return w


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
