"""A request as the coordinator tracks it, and the outputs users get back (vLLM-shaped)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..configs.sampling_params import SamplingParams


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list
    finish_reason: str | None  # "stop" (EOS / stop token) or "length"


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list
    outputs: list
    finished: bool = True
    metrics: dict = field(default_factory=dict)


@dataclass
class Request:
    rid: int
    prompt_ids: list
    params: SamplingParams
    eos_ids: tuple = ()
    out: list = field(default_factory=list)
    finish_reason: str | None = None
    rounds: int = 0  # target passes this request took part in
    rng: np.random.Generator | None = None

    def __post_init__(self):
        seed = self.params.seed if self.params.seed is not None else 0x5EED + self.rid
        self.rng = np.random.default_rng(seed)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def uniforms(self, n: int) -> np.ndarray:
        return self.rng.random(n, dtype=np.float32) if not self.params.greedy else np.zeros(n, np.float32)

    def extend(self, tokens) -> int:
        """Append emitted tokens, stopping at EOS/stop tokens or max_tokens; returns how many
        were kept."""
        stops = set(self.params.stop_token_ids) | (set() if self.params.ignore_eos else set(self.eos_ids))
        kept = 0
        for t in tokens:
            t = int(t)
            self.out.append(t)
            kept += 1
            if t in stops:
                self.finish_reason = "stop"
                break
            if len(self.out) >= self.params.max_tokens:
                self.finish_reason = "length"
                break
        return kept
