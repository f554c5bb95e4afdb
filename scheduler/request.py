"""A request as the coordinator tracks it, and the outputs users get back (vLLM-shaped)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..configs.sampling_params import SamplingParams
from ..outputs import CompletionOutput, RequestOutput  # noqa: F401  (their old home)
from ..stop_strings import StopStrings


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
    decode: object = None  # token ids -> text; needed by stop strings
    stop_reason: int | str | None = None  # the stop string or stop token id that ended the output
    text: str | None = None  # the output text when a stop string cut it
    logprobs: list | None = None  # per kept token: (logprob, rank, top ids, top logprobs)

    def __post_init__(self):
        seed = self.params.seed if self.params.seed is not None else 0x5EED + self.rid
        self.rng = np.random.default_rng(seed)
        if self.params.logprobs is not None:
            self.logprobs = []
        self._stop_strings = None
        if self.params.stop:
            if self.decode is None:
                raise ValueError("stop strings need Request(decode=...)")
            self._stop_strings = StopStrings(self.params.stop, self.params.include_stop_str_in_output, self.decode)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def uniforms(self, n: int) -> np.ndarray:
        return self.rng.random(n, dtype=np.float32) if not self.params.greedy else np.zeros(n, np.float32)

    def extend(self, tokens, lp: dict | None = None) -> int:
        """Append emitted tokens, stopping at EOS/stop tokens, stop strings or max_tokens;
        returns how many were kept (a speculative block that crosses a stop is cut there).
        lp: the target's log-probabilities at each of these positions (LogitsState.logprobs)."""
        p = self.params
        stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_ids))
        kept = 0
        for j, t in enumerate(tokens):
            t = int(t)
            self.out.append(t)
            kept += 1
            if self.logprobs is not None and lp is not None:
                n = p.logprobs
                self.logprobs.append((float(lp["chosen"][j]), int(lp["rank"][j]),
                                      [int(x) for x in lp["top_ids"][j][:n]], [float(x) for x in lp["top_lp"][j][:n]]))
            if t in stops and len(self.out) >= p.min_tokens:
                self.finish_reason = "stop"
                self.stop_reason = t if t in p.stop_token_ids else None  # EOS: None, as vLLM
                break
            if self._stop_strings is not None:
                hit = self._stop_strings.check(self.out, len(self.out) > p.min_tokens)
                if hit is not None:
                    self.stop_reason, self.text = hit
                    self.finish_reason = "stop"
                    break
            if len(self.out) >= self.params.max_tokens:
                self.finish_reason = "length"
                break
        return kept
