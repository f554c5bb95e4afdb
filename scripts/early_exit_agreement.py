"""How often the first N layers (plus final norm and head) of a model pick the same next token
as the whole model: the per-token agreement a self-speculative `--draft self:N` would get.

    python scripts/early_exit_agreement.py                 # the embedded SmolLM2-135M-Instruct
    python scripts/early_exit_agreement.py --model DIR --layers 8,16,24
"""

from __future__ import annotations

import argparse

import torch
import transformers as tf


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint folder (default: the embedded default model)")
    ap.add_argument("--layers", default="10,20,28,29")
    ap.add_argument("--text", default="Write a short story about a robot who learns to paint.")
    a = ap.parse_args(argv)
    if a.model is None:
        from specoffload.sources.default_model import default_model_dir

        a.model = str(default_model_dir())
    m = tf.AutoModelForCausalLM.from_pretrained(a.model).eval()
    tok = tf.AutoTokenizer.from_pretrained(a.model)
    chat = tok.apply_chat_template([{"role": "user", "content": a.text}], add_generation_prompt=True, tokenize=False)
    ids = tok(chat, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        full = m.generate(ids, max_new_tokens=128, do_sample=False)  # the model's own continuation
        out = m(full, output_hidden_states=True)
    want = out.logits[0].argmax(-1)[ids.shape[1] - 1: -1]
    print(f"{a.model}: {m.config.num_hidden_layers} layers, {len(want)} generated positions")
    for n in (int(x) for x in a.layers.split(",")):
        h = out.hidden_states[n][0, ids.shape[1] - 1: -1]
        agree = (m.lm_head(m.model.norm(h)).argmax(-1) == want).float().mean().item()
        print(f"self:{n:<3d} agreement {agree:.3f}")


if __name__ == "__main__":
    main()
