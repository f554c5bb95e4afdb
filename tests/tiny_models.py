"""Tiny random checkpoints of every family, saved through transformers' own classes."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe")

# One tiny config override per RoPE kind (llama family). original_max_position_embeddings (or,
# for dynamic, max_position_embeddings) is 32, so a 14-token prompt plus 32 new tokens runs past it.
ROPE_KINDS = {
    "default": {},
    "linear": {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
    "dynamic": {"max_position_embeddings": 32,
                "rope_parameters": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}},
    "yarn": {"max_position_embeddings": 128,
             "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                 "rope_theta": 10000.0}},
    "longrope": {"max_position_embeddings": 128,
                 "rope_parameters": {"rope_type": "longrope", "original_max_position_embeddings": 32,
                                     "short_factor": [1.0 + 0.05 * i for i in range(8)],
                                     "long_factor": [1.0 + 0.5 * i for i in range(8)], "rope_theta": 10000.0}},
    "llama3": {"max_position_embeddings": 128,
               "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
                                   "rope_theta": 10000.0}},
}


def tiny_config(family: str, **over):
    import transformers as tf

    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    extra = {
        "llama": (tf.LlamaConfig, {}),
        "mistral": (tf.MistralConfig, {"sliding_window": 8}),
        "mixtral": (tf.MixtralConfig, {"num_local_experts": 4, "num_experts_per_tok": 2}),
        "qwen2": (tf.Qwen2Config, {"tie_word_embeddings": True}),
        "qwen3": (tf.Qwen3Config, {"head_dim": 32}),
        # Many narrow experts, top-k not renormalised, layer 1 dense (mlp_only_layers), q/k norm.
        "qwen3_moe": (tf.Qwen3MoeConfig, {"head_dim": 32, "num_experts": 16, "num_experts_per_tok": 4,
                                         "moe_intermediate_size": 24, "norm_topk_prob": False,
                                         "mlp_only_layers": [1]}),
        # A shared expert behind its sigmoid gate; every second layer sparse (decoder_sparse_step).
        "qwen2_moe": (tf.Qwen2MoeConfig, {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                         "shared_expert_intermediate_size": 48, "norm_topk_prob": True,
                                         "decoder_sparse_step": 2, "num_hidden_layers": 4}),
    }[family]
    cls, kw = extra
    return cls(**(common | kw | over))


def make_tiny(family: str, folder: Path, seed: int = 0, **over) -> Path:
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_config(family, **over)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    # Larger weights than the init default so logits are peaked and greedy output is stable.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.15)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    return folder


def save_tiny_tokenizer(folder: Path, vocab_size: int = 96) -> None:
    """A word-level tokenizer whose words are w3..wN, with <pad>=0, <s>=1, </s>=2."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<pad>")
    fast.save_pretrained(folder)


def make_tiny_with_tokenizer(family: str, folder: Path, seed: int = 0, **over) -> Path:
    make_tiny(family, folder, seed, **over)
    save_tiny_tokenizer(folder, tiny_config(family, **over).vocab_size)
    return folder
