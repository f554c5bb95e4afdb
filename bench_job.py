"""A batch job for `specoffload bench --workload w1-long`: requests of mixed prompt lengths whose
outputs end at EOS at mixed points, the same (seeded) for every mode.

Prompt lengths: half HumanEval-like (short code prompts), half chat-like (a long tail), both
lognormal, clipped to [lo, hi]; shuffled together. The shapes are chosen to look like those
sets, not fitted to them. Output lengths are drawn uniformly, and each output really ends by
EOS: the constructed target's greedy next token is a permutation of the vocabulary
(sources/constructed.py), so a prompt ending in the token L steps before EOS on that chain
makes the target emit EOS as its L-th token (max_tokens is the range's top, a cap never hit
unless the model strays from the chain).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ConfigError


@dataclass(frozen=True)
class JobShape:
    requests: int = 768
    prompt_lo: int = 128
    prompt_hi: int = 1024
    gen_lo: int = 32
    gen_hi: int = 256
    seed: int = 0

    def __post_init__(self):
        if self.requests < 1 or not 2 <= self.prompt_lo <= self.prompt_hi or not 1 <= self.gen_lo <= self.gen_hi:
            raise ConfigError(f"a job needs requests >= 1, 2 <= prompt_lo <= prompt_hi, 1 <= gen_lo <= gen_hi: {self}")

    def prompt_lengths(self, rng: np.random.Generator) -> np.ndarray:
        n = self.requests
        # medians 1.4 and 3.3 times the shortest: at 128-1024, HumanEval-like most 120-330 tokens,
        # chat-like a tail to the cap
        code = rng.lognormal(np.log(1.4 * self.prompt_lo), 0.4, n // 2)
        chat = rng.lognormal(np.log(3.3 * self.prompt_lo), 0.7, n - n // 2)
        lens = np.concatenate([code, chat])
        rng.shuffle(lens)
        return np.clip(lens.round(), self.prompt_lo, self.prompt_hi).astype(int)

    def gen_lengths(self, rng: np.random.Generator) -> np.ndarray:
        return rng.integers(self.gen_lo, self.gen_hi + 1, self.requests)


def chain_start(next_token: np.ndarray, eos: int, steps: int) -> int:
    """The token whose greedy continuation reaches `eos` as its `steps`-th token."""
    inv = np.empty_like(next_token)
    inv[next_token] = np.arange(len(next_token))
    t = eos
    for _ in range(steps):
        t = int(inv[t])
    return t


def eos_cycle(next_token: np.ndarray, eos: int) -> int:
    """Length of the cycle through eos: no output can end by EOS after more steps than this."""
    t, n = int(next_token[eos]), 1
    while t != eos:
        t, n = int(next_token[t]), n + 1
    return n


def job_payload(shape: JobShape, next_token: np.ndarray, eos: int, vocab: int) -> list[dict]:
    """The job's requests as the coordinator takes them (rid, prompt_ids, params, eos)."""
    if eos_cycle(next_token, eos) < shape.gen_hi:
        raise ConfigError(f"the constructed target's EOS cycle is shorter than {shape.gen_hi} tokens: "
                          f"pick another seed")
    rng = np.random.default_rng(shape.seed)
    plens, glens = shape.prompt_lengths(rng), shape.gen_lengths(rng)
    out = []
    for i, (p, g) in enumerate(zip(plens.tolist(), glens.tolist())):
        prompt = rng.integers(3, vocab, p).tolist()
        prompt[-1] = chain_start(next_token, eos, g)
        out.append({"rid": i, "prompt_ids": prompt, "params": {"max_tokens": shape.gen_hi, "ignore_eos": False},
                    "eos": [eos]})
    return out
