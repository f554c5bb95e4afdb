"""Logits -> probabilities -> tokens, vectorised over a batch with per-sequence settings.

Randomness comes in as uniforms drawn by the coordinator from each request's own
generator, so a seeded request samples the same tokens whatever batch it lands in and
wherever the math runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..models.host_io import to_device


@dataclass
class SamplingTensors:
    """Per-sequence settings of one batch, as arrays (they cross actors as numpy)."""

    temperature: np.ndarray  # [B] float32, 0 = greedy
    top_k: np.ndarray  # [B] int64, <= 0 = off
    top_p: np.ndarray  # [B] float32
    extra: object = None  # logits_process.LogitsSettings: penalties, min_tokens, logprobs (None: none asked)

    def to(self, device):
        return to_device(self.temperature, device), to_device(self.top_k, device), to_device(self.top_p, device)

    def select(self, idx):
        return SamplingTensors(self.temperature[idx], self.top_k[idx], self.top_p[idx],
                               None if self.extra is None else self.extra.select(idx))

    def concat(self, other: "SamplingTensors") -> "SamplingTensors":
        """This batch's rows followed by other's (waiting requests joining a running batch)."""
        from .logits_process import concat_settings

        return SamplingTensors(np.concatenate([self.temperature, other.temperature]),
                               np.concatenate([self.top_k, other.top_k]), np.concatenate([self.top_p, other.top_p]),
                               concat_settings(self.extra, len(self.temperature), other.extra, len(other.temperature)))

    @property
    def all_greedy(self) -> bool:
        return bool((self.temperature == 0).all())


def probs_from_logits(logits: torch.Tensor, temperature, top_k, top_p) -> torch.Tensor:
    """logits [B, n, V] fp32 -> probabilities [B, n, V] with temperature, top-k, top-p.

    Greedy rows (temperature 0) become one-hot on the argmax, so the rejection rule below
    reduces exactly to greedy verification for them.
    """
    B, n, V = logits.shape
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature)
    x = logits / t[:, None, None]
    k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V))
    if bool((k < V).any()) or bool((top_p < 1).any()):
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        ranks = torch.arange(V, device=x.device)
        drop = (ranks[None, None, :] >= k[:, None, None]).expand(B, n, V)
        p_sorted = torch.softmax(sorted_x.masked_fill(drop, float("-inf")), dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the top token is always kept).
        cum = torch.cumsum(p_sorted, dim=-1) - p_sorted
        drop = drop | (cum >= top_p[:, None, None])
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(-1, order, sorted_x)
    probs = torch.softmax(x, dim=-1)
    if bool(greedy.any()):
        onehot = torch.zeros_like(probs).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        probs = torch.where(greedy[:, None, None], onehot, probs)
    return probs


def sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: probs [..., V], u [...] uniform in [0, 1) -> token ids [...]."""
    cdf = torch.cumsum(probs, dim=-1)
    target = (u * cdf[..., -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    # Never land on a zero-probability token through rounding at the top of the CDF.
    idx = idx.clamp(max=probs.shape[-1] - 1)
    bad = probs.gather(-1, idx.unsqueeze(-1)).squeeze(-1) <= 0
    if bool(bad.any()):
        idx = torch.where(bad, probs.argmax(-1), idx)
    return idx
