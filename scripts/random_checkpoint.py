"""Random Hugging Face checkpoint folders of real model shapes, written to disk as users have them.

    python scripts/random_checkpoint.py --shape mixtral-8x7b --layers 4 --out /tmp/mixtral4
    python scripts/random_checkpoint.py --shape mistral-7b --out /tmp/mistral

config.json through transformers' own config class, one safetensors shard per layer (plus one
for embeddings, norm and head) under HF tensor names with an index, and a word-level tokenizer
of the shape's vocabulary (words w3..wN; <pad>=0, <s>=1, </s>=2), so the engine's whole user
path (loading, planning from the checkpoint, the CLI) runs on shapes no machine here holds.
Weights are drawn on the GPU when there is one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SHAPES = {
    # transformers config class, its arguments (DESIGN.md's W1 shapes)
    "mixtral-8x7b": ("MixtralConfig", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                           num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                                           vocab_size=32000, num_hidden_layers=32)),
    "mistral-7b": ("MistralConfig", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                         num_key_value_heads=8, vocab_size=32000, num_hidden_layers=32,
                                         sliding_window=None)),
    # W3's shapes (models/w3_shapes.py): Qwen3-30B-A3B and Qwen3-0.6B
    "qwen3-30b-a3b": ("Qwen3MoeConfig", dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                             num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                                             num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                                             vocab_size=151936, num_hidden_layers=48, rope_theta=1e6)),
    "qwen3-0.6b": ("Qwen3Config", dict(hidden_size=1024, intermediate_size=3072, num_attention_heads=16,
                                       num_key_value_heads=8, head_dim=128, vocab_size=151936,
                                       num_hidden_layers=28, rope_theta=1e6)),
}

_HF = {"ln1": "input_layernorm.weight", "ln2": "post_attention_layernorm.weight",
       "q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight",
       "o": "self_attn.o_proj.weight", "q_bias": "self_attn.q_proj.bias", "k_bias": "self_attn.k_proj.bias",
       "v_bias": "self_attn.v_proj.bias", "q_norm": "self_attn.q_norm.weight",
       "k_norm": "self_attn.k_norm.weight", "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight",
       "down": "mlp.down_proj.weight", "router": "block_sparse_moe.gate.weight"}
_EXPERT = {"w_gate": "w1", "w_up": "w3", "w_down": "w2"}


_QWEN_EXPERT = {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}


def hf_layer(j: int, w: dict, qwen_moe: bool = False) -> dict:
    """Our flat layer dict -> HF tensor names (experts one tensor each: Mixtral's w1/w3/w2 under
    block_sparse_moe, or the Qwen MoE ones under mlp)."""
    out = {}
    for key, t in w.items():
        if key in _EXPERT:
            for e in range(t.shape[0]):
                name = (f"mlp.experts.{e}.{_QWEN_EXPERT[key]}" if qwen_moe
                        else f"block_sparse_moe.experts.{e}.{_EXPERT[key]}")
                out[f"model.layers.{j}.{name}.weight"] = t[e].contiguous()
        elif key == "router" and qwen_moe:
            out[f"model.layers.{j}.mlp.gate.weight"] = t.contiguous()
        else:
            out[f"model.layers.{j}.{_HF[key]}"] = t.contiguous()
    return out


def save_tokenizer(folder: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<pad>").save_pretrained(folder)


def write_checkpoint(folder, shape: str, layers: int | None = None, seed: int = 0, std: float = 0.02) -> Path:
    import transformers
    from safetensors.torch import save_file

    from specoffload.models.random_weights import random_globals, random_layer
    from specoffload.models.spec import load_spec

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cls, kw = SHAPES[shape]
    kw = dict(kw, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
              max_position_embeddings=4096)
    if layers:
        kw["num_hidden_layers"] = layers
    cfg = getattr(transformers, cls)(**kw)
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(folder)
    spec = load_spec(folder)
    weight_map = {}
    for j in range(spec.num_layers):
        name = f"model-layer{j:03d}.safetensors"
        tensors = hf_layer(j, random_layer(spec, j, seed, std=std), qwen_moe=spec.model_type.endswith("_moe"))
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, name)
    g = random_globals(spec, seed, std=std)
    glob = {"model.embed_tokens.weight": g["embed"], "model.norm.weight": g["norm"], "lm_head.weight": g["head"]}
    save_file({k: v.contiguous() for k, v in glob.items()}, str(folder / "model-globals.safetensors"),
              metadata={"format": "pt"})
    weight_map |= dict.fromkeys(glob, "model-globals.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    save_tokenizer(folder, spec.vocab_size)
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Write a random Hugging Face checkpoint of a real model's shape.")
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True, help="the model shape to write.")
    ap.add_argument("--layers", type=int, help="decoder layers (default: the shape's own count).")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0).")
    ap.add_argument("--out", required=True, help="the folder to write (created if missing).")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    write_checkpoint(a.out, a.shape, a.layers, a.seed)
    size = sum(f.stat().st_size for f in Path(a.out).iterdir()) / 2**30
    print(f"wrote {a.out}: {size:.1f} GiB in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
