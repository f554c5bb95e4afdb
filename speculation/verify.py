"""Speculative verification: which drafted tokens the target accepts.

Greedy: the longest prefix of the draft that matches the target's argmax, plus the
target's own next token. Sampled: the standard rejection rule (accept d_i with probability
min(1, p_i(d_i) / q_i(d_i)); on the first rejection draw from norm(max(0, p_i - q_i)); if
all k are accepted draw a bonus token from p_k), so output follows the target's
distribution exactly. k = 0 is plain decoding.
"""

from __future__ import annotations

import torch

from .sampler import sample


def leading_true(mask: torch.Tensor) -> torch.Tensor:
    """[B, k] bool -> [B] count of leading True values."""
    if mask.shape[1] == 0:
        return torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)
    return torch.cumprod(mask.long(), dim=1).sum(dim=1)


def verify_greedy(target_logits: torch.Tensor, draft_tokens: torch.Tensor):
    """target_logits [B, k+1, V], draft_tokens [B, k] -> tokens [B, k+1], counts [B].

    tokens[b, :counts[b]] are the emitted tokens (accepted drafts then the target's).
    """
    best = target_logits.argmax(-1)  # [B, k+1]
    a = leading_true(draft_tokens == best[:, :-1])
    return best, a + 1  # accepted drafts equal best[:, :a]; best[:, a] is the target's token


def verify_sampled(p: torch.Tensor, draft_tokens: torch.Tensor, q: torch.Tensor,
                   u_accept: torch.Tensor, u_sample: torch.Tensor):
    """p [B, k+1, V] target probs, q [B, k, V] draft probs, uniforms u_accept [B, k], u_sample [B]."""
    B, k1, V = p.shape
    k = k1 - 1
    rows = torch.arange(B, device=p.device)
    if k:
        pd = p[:, :k].gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)
        qd = q.gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)
        ratio = torch.where(qd > 0, pd / qd.clamp_min(1e-30), torch.zeros_like(pd))
        a = leading_true(u_accept < ratio)
    else:
        a = torch.zeros(B, dtype=torch.long, device=p.device)
    p_a = p[rows, a]  # [B, V]
    if k:
        q_a = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)[rows, a]  # zero past the last draft
        resid = (p_a - q_a).clamp_min(0)
        # All accepted (a == k): q_a is zero, so this is the bonus draw from p_k. If p - q is
        # zero everywhere (p == q), fall back to p, which the rule then samples exactly.
        empty = resid.sum(-1, keepdim=True) <= 0
        dist = torch.where(empty, p_a, resid)
    else:
        dist = p_a
    last = sample(dist, u_sample)
    tokens = torch.cat([draft_tokens, draft_tokens.new_zeros(B, 1)], dim=1)
    tokens[rows, a] = last
    return tokens, a + 1
