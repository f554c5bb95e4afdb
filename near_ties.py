"""Greedy output against a reference run's (plain decoding), where bf16 may round differently.

No batched engine's bf16 arithmetic is batch-invariant: a verification pass's k+1 tokens per
row, or another batch's padding, round attention differently from plain decoding's one token
(on the CPU, plain decoding of a random 2-layer Mixtral at batch 16 and 48 differs on 2 of 48
prompts). Where the reference's top two tokens are that close, greedy output may take the
other; after it, the sequences part for good. So an output agrees with the reference when it
equals it, or first differs where the reference's top-2 log probabilities were within NEAR_TIE
and it took the second there. A bookkeeping or KV bug departs where the gap is wide."""

from __future__ import annotations

NEAR_TIE = 0.05  # nats


def compare(got: list[int], ref: list[int], ref_logprobs: list[dict] | None) -> tuple[bool, int | None, float | None]:
    """(agrees, the first position where they differ or None when equal, the reference's top-2
    gap there or None). ref_logprobs: per reference token, {token id: log probability} of at
    least its top two (None: no log probabilities, so only equal output agrees)."""
    d = next((p for p, (x, y) in enumerate(zip(got, ref)) if x != y), None)
    if d is None:
        return len(got) == len(ref), None if len(got) == len(ref) else min(len(got), len(ref)), None
    top = sorted(ref_logprobs[d].items(), key=lambda kv: -kv[1])[:2] if ref_logprobs else []
    gap = top[0][1] - top[1][1] if len(top) == 2 else float("inf")
    return gap < NEAR_TIE and got[d] == top[1][0], d, gap
