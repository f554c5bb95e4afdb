"""W3's model shapes: a Qwen3-30B-A3B-shaped target (48 layers of 128 experts, top-8, each
768 wide; ~61 GB in bf16) and a Qwen3-0.6B-shaped draft (28 dense layers, tied head, the same
vocabulary). Built as constructed pairs (models/constructed.py) for `specoffload bench
--workload w3` and planned with `specoffload plan --shapes w3`."""

from __future__ import annotations

from .spec import ModelSpec

QWEN3_VOCAB = 151936


def qwen3_30b_a3b(num_layers: int = 48, dtype: str = "bfloat16") -> ModelSpec:
    return ModelSpec(model_type="qwen3_moe", vocab_size=QWEN3_VOCAB, hidden_size=2048, intermediate_size=6144,
                     num_layers=num_layers, num_heads=32, num_kv_heads=4, head_dim=128, rms_eps=1e-6,
                     rope_theta=1e6, max_positions=40960, qk_norm=True, num_experts=128, experts_per_token=8,
                     moe_intermediate_size=768, norm_topk_prob=True, dtype=dtype, eos_token_ids=(151645,))


def qwen3_0_6b(num_layers: int = 28, dtype: str = "bfloat16") -> ModelSpec:
    return ModelSpec(model_type="qwen3", vocab_size=QWEN3_VOCAB, hidden_size=1024, intermediate_size=3072,
                     num_layers=num_layers, num_heads=16, num_kv_heads=8, head_dim=128, rms_eps=1e-6,
                     rope_theta=1e6, max_positions=40960, tie_embeddings=True, qk_norm=True, dtype=dtype,
                     eos_token_ids=(151645,))
