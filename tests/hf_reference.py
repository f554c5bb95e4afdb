"""What transformers' own `generate` produces: the ground truth the engine must match."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=16)
def hf_model(folder: str):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(folder).eval()


def hf_greedy(folder, prompts, max_new_tokens, eos_token_id=None):
    """Greedy continuation of each prompt (one at a time, no padding), cut after EOS."""
    m = hf_model(str(folder))
    m.generation_config.eos_token_id = eos_token_id  # None: never stop early
    outs = []
    for p in prompts:
        with torch.no_grad():
            g = m.generate(torch.tensor([p]), max_new_tokens=max_new_tokens, do_sample=False,
                           pad_token_id=0)
        outs.append(g[0, len(p):].tolist())
    return outs


PROMPTS = [[1, 5, 7, 9, 11, 3, 4, 5, 6, 7, 8, 9, 10, 20], [1, 40, 41], [1, 60, 61, 62, 63, 64], [1, 33]]


def first_new_token(seq, start: int) -> tuple[int, int]:
    """(index, token) of the first token at or after `start` that does not occur earlier."""
    for i in range(start, len(seq)):
        if seq[i] not in seq[:i]:
            return i, seq[i]
    raise AssertionError("no fresh token to use as a stop token")


# bf16 is not batch-invariant: a verification pass's k+1 tokens per row round differently from
# plain decoding's one, so greedy output on a GPU in bf16 may take the other token where plain
# decoding's top two log probabilities are this close (tiny random models have flat logits).
NEAR_TIE = 0.05


def differ_beyond_near_ties(got: list[list[int]], plain) -> list[str]:
    """Sequences of `got` that leave plain decoding's output anywhere but at a near-tie of its
    own (`plain`: RequestOutputs generated with SamplingParams(logprobs>=2)), taking there the
    other of the two: each as a line saying where and by how much; empty when none do."""
    bad = []
    for i, (g, o) in enumerate(zip(got, plain)):
        c = o.outputs[0]
        d = next((p for p, (x, y) in enumerate(zip(g, c.token_ids)) if x != y), None)
        if d is None:
            if len(g) != len(c.token_ids):
                bad.append(f"sequence {i}: {len(g)} tokens, plain {len(c.token_ids)}")
            continue
        top = sorted(c.logprobs[d].items(), key=lambda kv: -kv[1].logprob)[:2]
        gap = top[0][1].logprob - top[1][1].logprob if len(top) == 2 else float("inf")
        if not (gap < NEAR_TIE and g[d] == top[1][0]):
            bad.append(f"sequence {i} differs at token {d}: {g[d]} for {c.token_ids[d]}, plain's top-2 gap {gap:.3f}")
    return bad
