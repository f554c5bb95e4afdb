"""Tiny random checkpoints of every family, saved through transformers' own classes."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "mistral", "mixtral", "qwen2", "qwen3")


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
