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


def differ_beyond_near_ties(got, plain, moe_router: bool = False) -> list[str]:
    """Sequences of `got` that leave plain decoding's output anywhere but at a swap of its
    near-tied top two tokens (specoffload/near_ties.py). `plain`, and `got` where it is
    RequestOutputs too, generated with SamplingParams(logprobs>=2); `got` may be bare token ids
    (then only plain's gap is known). Each as a line saying where and by how much; empty when
    none do.

    moe_router: a bf16 MoE on the GPU, where a router that flips a token's experts under
    rounding moves its log probabilities by tenths of a nat (docs/results/bf16_router_s11), more
    than the drift measured where the runs agree: a swap of plain's top two passes whatever its
    gaps, while the 90th percentile of the drift stays rounding-sized (the GPU check's rule). A
    bookkeeping bug still fails: it takes a token that is not plain's runner-up."""
    from specoffload.near_ties import TYPICAL_CAP, Sequence, judge

    def ids_lps(o):
        if isinstance(o, list):
            return o, None
        c = o.outputs[0]
        return c.token_ids, [{t: lp.logprob for t, lp in x.items()} for x in c.logprobs] if c.logprobs else None

    seqs = []
    for g, p in zip(got, plain):
        (gi, gl), (pi, pl) = ids_lps(g), ids_lps(p)
        seqs.append(Sequence(gi, pi, gl, pl))
    v = judge(seqs)
    if not moe_router:
        return v.bad
    bad = [b for b in v.bad if not (b.startswith("sequence") and "together, over" in b)]
    if v.typical > TYPICAL_CAP:
        bad.append(f"the drift's 90th percentile {v.typical:.3f} nats is over {TYPICAL_CAP} (more than rounding)")
    return bad
