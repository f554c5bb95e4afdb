"""vLLM's logits processing on the engine's side: repetition / presence / frequency penalties,
min_tokens, and the target's log-probabilities of generated tokens.

Speculation stays lossless with penalties because each verified position is processed with
the history it would have had in plain decoding: position j of a block [last, d1..dk] counts
the output so far plus d1..dj. The draft's proposals go through the same processing (its
history: output so far plus its own earlier proposals), so what it proposes, and the q its
proposals were drawn from, are those of the penalized draft; the rejection rule then needs
nothing else to follow the penalized target.

Semantics are vLLM's (v1 sampler): repetition penalty over prompt and output tokens (logit / p
where positive, * p otherwise), then logit -= frequency * count + presence * (count > 0) over
output tokens; min_tokens masks the stop tokens (EOS unless ignore_eos, and stop_token_ids)
while the output is shorter. Temperature and top-k/top-p come after, in sampler.py.

Log-probabilities follow vLLM's default `logprobs_mode="raw_logprobs"`: the log-softmax of
the target's raw logits, before penalties, temperature and top-k/top-p.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..models.host_io import to_device


@dataclass
class LogitsSettings:
    """Per-sequence processing settings of one batch (host side; they cross actors)."""

    rep: np.ndarray  # [B] float32, 1 = off
    presence: np.ndarray  # [B] float32
    frequency: np.ndarray  # [B] float32
    min_tokens: np.ndarray  # [B] int64
    stop_ids: list  # per sequence: the tokens min_tokens holds back
    prompts: list | None  # per sequence: prompt tokens (the repetition penalty counts them)
    logprobs: np.ndarray  # [B] int64, -1 = none

    def select(self, idx):
        idx = list(np.asarray(idx).tolist())
        return LogitsSettings(self.rep[idx], self.presence[idx], self.frequency[idx], self.min_tokens[idx],
                              [self.stop_ids[i] for i in idx],
                              None if self.prompts is None else [self.prompts[i] for i in idx], self.logprobs[idx])

    @property
    def penalized(self) -> bool:
        return bool((self.rep != 1).any() or (self.presence != 0).any() or (self.frequency != 0).any()
                    or (self.min_tokens > 0).any())

    @property
    def wants_logprobs(self) -> bool:
        return bool((self.logprobs >= 0).any())


def neutral_settings(n: int) -> LogitsSettings:
    """Settings of n sequences that ask for none of this (to sit beside ones that do)."""
    return LogitsSettings(np.ones(n, np.float32), np.zeros(n, np.float32), np.zeros(n, np.float32),
                          np.zeros(n, np.int64), [[] for _ in range(n)], None, np.full(n, -1, np.int64))


def concat_settings(a: LogitsSettings | None, na: int, b: LogitsSettings | None, nb: int) -> LogitsSettings | None:
    """Rows of a (na sequences) followed by rows of b; None where neither asks for anything."""
    if a is None and b is None:
        return None
    a, b = a or neutral_settings(na), b or neutral_settings(nb)
    prompts = None
    if a.prompts is not None or b.prompts is not None:
        prompts = (a.prompts or [[] for _ in range(na)]) + (b.prompts or [[] for _ in range(nb)])
    return LogitsSettings(np.concatenate([a.rep, b.rep]), np.concatenate([a.presence, b.presence]),
                          np.concatenate([a.frequency, b.frequency]), np.concatenate([a.min_tokens, b.min_tokens]),
                          a.stop_ids + b.stop_ids, prompts, np.concatenate([a.logprobs, b.logprobs]))


def logits_settings(reqs) -> LogitsSettings | None:
    """The batch's settings, or None when no request needs any of this (the plain path runs)."""
    ps = [r.params for r in reqs]
    if not any(p.penalized or p.logprobs is not None for p in ps):
        return None
    rep = np.array([p.repetition_penalty for p in ps], np.float32)
    stop_ids = [sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else set(r.eos_ids)))
                for p, r in zip(ps, reqs)]
    return LogitsSettings(rep, np.array([p.presence_penalty for p in ps], np.float32),
                          np.array([p.frequency_penalty for p in ps], np.float32),
                          np.array([p.min_tokens for p in ps], np.int64), stop_ids,
                          [list(r.prompt_ids) for r in reqs] if (rep != 1).any() else None,
                          np.array([-1 if p.logprobs is None else p.logprobs for p in ps], np.int64))


class LogitsState:
    """A batch's processing state on the device: what each sequence has output so far."""

    def __init__(self, s: LogitsSettings, device):
        self.s, self.device = s, device
        B = len(s.rep)
        self.rep = to_device(s.rep, device, torch.float32)
        self.presence = to_device(s.presence, device, torch.float32)
        self.frequency = to_device(s.frequency, device, torch.float32)
        self.min_tokens = to_device(s.min_tokens, device, torch.long)
        self.n_out = torch.zeros(B, dtype=torch.long, device=device)
        self.counts = None  # [B, V] output token counts, made when the vocabulary size is known
        self.prompt_mask = None  # [B, V] tokens in the prompt (repetition penalty only)
        self.stop_mask = None  # [B, V] tokens min_tokens holds back

    def _ensure(self, V: int):
        if self.counts is not None:
            return
        B, dev = len(self.s.rep), self.device
        self.counts = torch.zeros(B, V, dtype=torch.float32, device=dev)
        if self.s.prompts is not None:
            self.prompt_mask = _mask(self.s.prompts, V, dev)
        if (self.s.min_tokens > 0).any():
            self.stop_mask = _mask(self.s.stop_ids, V, dev)

    def select(self, idx):
        t = to_device(np.asarray(idx), self.device, torch.long)
        self.s = self.s.select(idx)
        for name in ("rep", "presence", "frequency", "min_tokens", "n_out", "counts", "prompt_mask", "stop_mask"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, v[t])

    def concat(self, other: "LogitsState | None", n_other: int) -> "LogitsState":
        """This batch's rows followed by other's (None: n_other sequences that ask for nothing).
        A side without its [B, V] tables has used none of them (its rows are not penalized),
        so zeros stand in for them."""
        n = len(self.s.rep)
        other = other or LogitsState(neutral_settings(n_other), self.device)
        s = concat_settings(self.s, n, other.s, n_other)
        out = LogitsState(s, self.device)
        out.n_out = torch.cat([self.n_out, other.n_out])
        V = next((x.counts.shape[1] for x in (self, other) if x.counts is not None), None)
        if V is not None:
            for x in (self, other):
                x._ensure(V)
            out.counts = torch.cat([self.counts, other.counts])
            for name, built in (("prompt_mask", s.prompts is not None), ("stop_mask", bool((s.min_tokens > 0).any()))):
                if built:
                    parts = [getattr(x, name) if getattr(x, name) is not None else
                             torch.zeros(len(x.s.rep), V, dtype=torch.bool, device=self.device) for x in (self, other)]
                    setattr(out, name, torch.cat(parts))
        return out

    def process(self, logits: torch.Tensor, hist: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """logits [b, n, V] of the sequences `rows`; hist [b, m] tokens after the output so far
        (m >= n - 1); position j sees the output plus hist[:, :m - n + 1 + j]. Returns new
        fp32 logits, penalized as plain decoding would at each position."""
        b, n, V = logits.shape
        self._ensure(V)
        x = logits.float()
        m = hist.shape[1]
        c = self.counts[rows][:, None, :].expand(b, n, V)
        if m:
            extra = torch.zeros(b, n, V, dtype=torch.float32, device=x.device)
            ones = torch.ones(b, 1, 1, dtype=torch.float32, device=x.device)
            for t in range(m):
                j0 = max(0, t - m + n)
                if j0 < n:
                    extra[:, j0:].scatter_add_(-1, hist[:, t].view(b, 1, 1).expand(b, n - j0, 1),
                                               ones.expand(b, n - j0, 1))
            c = c + extra
        rep = self.rep[rows]
        if self.prompt_mask is not None:  # some sequence has a repetition penalty
            seen = self.prompt_mask[rows][:, None, :] | (c > 0)
            r = torch.where(seen, rep[:, None, None], torch.ones_like(x))
            x = torch.where(x > 0, x / r, x * r)
        x = x - self.frequency[rows][:, None, None] * c - self.presence[rows][:, None, None] * (c > 0).float()
        if self.stop_mask is not None:
            lens = self.n_out[rows][:, None] + (m - n + 1) + torch.arange(n, device=x.device)[None, :]
            hold = (lens < self.min_tokens[rows][:, None])[:, :, None] & self.stop_mask[rows][:, None, :]
            x = x.masked_fill(hold, float("-inf"))
        return x

    def update(self, tokens: torch.Tensor, counts: torch.Tensor):
        """The emitted tokens[b, :counts[b]] join each sequence's output."""
        if self.counts is None:  # nothing penalized: only the lengths matter
            self.n_out += counts
            return
        k1 = tokens.shape[1]
        w = (torch.arange(k1, device=tokens.device)[None, :] < counts[:, None]).float()
        self.counts.scatter_add_(-1, tokens, w)
        self.n_out += counts

    def logprobs(self, raw: torch.Tensor, tokens: torch.Tensor) -> dict:
        """The target's log-softmax of its raw logits [B, n, V] at each position: the chosen
        token's (tokens [B, n]) value and rank, and the top N (N: the most any sequence asked
        for), as numpy arrays."""
        lp = torch.log_softmax(raw.float(), dim=-1)
        chosen = lp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        rank = (lp > chosen.unsqueeze(-1)).sum(-1) + 1
        N = int(min(max(int(self.s.logprobs.max()), 0), lp.shape[-1]))
        top_lp, top_ids = lp.topk(N, dim=-1) if N else (lp[..., :0], tokens[..., None][..., :0])
        return {"chosen": chosen.cpu().numpy(), "rank": rank.cpu().numpy(),
                "top_ids": top_ids.cpu().numpy(), "top_lp": top_lp.cpu().numpy()}


def _mask(ids: list, V: int, device) -> torch.Tensor:
    m = torch.zeros(len(ids), V, dtype=torch.bool)
    for i, row in enumerate(ids):
        row = [t for t in row if 0 <= t < V]
        if row:
            m[i, row] = True
    return m.to(device)
