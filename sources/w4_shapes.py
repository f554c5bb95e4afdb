"""W4's model shapes: a Llama-3.1-70B-shaped target (80 layers, hidden 8192, FFN 28672, 64 heads,
8 KV heads, vocabulary 128,256, llama3 RoPE; 141 GB in bf16, ~70 GB in fp8) and a
Llama-3.2-1B-shaped draft (16 layers, hidden 2048, FFN 8192, 32 heads, 8 KV heads, tied head).
The specs come from transformers' LlamaConfig with those models' published config values, so
RoPE scaling is read the way a real checkpoint's would be. Built as constructed pairs
(constructed.py) for `specoffload bench --workload w4` (the target quantized to fp8 at load:
bf16 would not fit the GPU machine's host memory) and planned with `specoffload plan --shapes w4`."""

from __future__ import annotations

from ..models.spec import ModelSpec

LLAMA3_VOCAB = 128256
_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192, "rope_theta": 500000.0}


def _llama(**kw) -> ModelSpec:
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=LLAMA3_VOCAB, max_position_embeddings=131072, rms_norm_eps=1e-5,
                      rope_parameters=_ROPE, bos_token_id=128000, eos_token_id=128001, **kw)
    return ModelSpec.from_hf_config(cfg, dtype="bfloat16")


def llama_3_1_70b(num_layers: int = 80) -> ModelSpec:
    return _llama(hidden_size=8192, intermediate_size=28672, num_hidden_layers=num_layers, num_attention_heads=64,
                  num_key_value_heads=8, tie_word_embeddings=False)


def llama_3_2_1b(num_layers: int = 16) -> ModelSpec:
    return _llama(hidden_size=2048, intermediate_size=8192, num_hidden_layers=num_layers, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=64, tie_word_embeddings=True)
