"""Per-request sampling settings, shaped like vLLM's.

The names and meanings are vLLM's (`n`, `stop`, `stop_token_ids`, `logprobs`, `min_tokens`,
the three penalties, `seed`, ...). Two defaults differ on purpose: `temperature` 0 (greedy)
and `max_tokens` 64, which the CLI, the Ray job and every equivalence test rely on;
`specoffload.vllm.SamplingParams` has vLLM's (1.0 and 16) for scripts written for vLLM.
A vLLM parameter this engine does not implement is a one-line ConfigError naming it, unless
it is passed at its no-op value (`best_of=1`, `use_beam_search=False`, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from ..errors import ConfigError

# vLLM parameters accepted only at the value that changes nothing here.
NOOP_VALUES = {
    "best_of": (None, 1), "use_beam_search": (False,), "length_penalty": (1.0,), "early_stopping": (False,),
    "min_p": (0.0, 0), "logit_bias": (None, {}), "allowed_token_ids": (None,), "bad_words": (None, []),
    "guided_decoding": (None,), "structured_outputs": (None,), "logits_processors": (None, []),
    "truncate_prompt_tokens": (None,), "detokenize": (True,), "spaces_between_special_tokens": (True,),
    "output_kind": (None,), "extra_args": (None, {}), "prompt_logprobs": (None,),
}


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0 = off
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: tuple = ()
    n: int = 1  # samples per prompt (each a request of its own, seed + j when seeded)
    stop: tuple = ()  # strings, matched on the detokenized output
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # top-N of the target's log-softmax per generated token (+ the chosen)
    min_tokens: int = 0  # EOS / stop tokens / stop strings cannot end the output before this
    repetition_penalty: float = 1.0  # prompt + output tokens: logit / p if > 0 else logit * p
    presence_penalty: float = 0.0  # output tokens: logit -= presence * (count > 0)
    frequency_penalty: float = 0.0  # output tokens: logit -= frequency * count
    skip_special_tokens: bool = True

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0 <= self.temperature < float("inf"):  # NaN fails this too
            raise ConfigError(f"temperature must be >= 0 and finite, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ConfigError(f"top_k must be -1 or 0 (off) or a positive integer, got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise ConfigError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if not isinstance(self.n, int) or self.n < 1:
            raise ConfigError(f"n must be a positive integer, got {self.n!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if not all(isinstance(s, str) and s for s in stop):
            raise ConfigError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in (self.stop_token_ids or ())))
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            raise ConfigError(f"logprobs must be None or an integer >= 0, got {self.logprobs!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ConfigError(f"min_tokens must be in 0..max_tokens ({self.max_tokens}), got {self.min_tokens!r}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ConfigError(f"{name} must be in [-2, 2], got {getattr(self, name)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Whether the logits need processing before sampling (penalties or min_tokens)."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.min_tokens > 0)

    def to_dict(self) -> dict:
        """The fields, as the Ray actors receive them (SamplingParams(**d) rebuilds it)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def accept_vllm_names(cls):
    """Wrap a SamplingParams dataclass's __init__: a vLLM parameter it does not implement is
    a one-line ConfigError naming it (TypeError would not say whether it is a typo or vLLM's)."""
    init = cls.__init__
    known = {f.name for f in fields(cls)}

    def __init__(self, *args, **kw):
        for name in [n for n in kw if n not in known]:
            if name in NOOP_VALUES and kw[name] in NOOP_VALUES[name]:
                del kw[name]  # vLLM's own default: nothing to do
            elif name in NOOP_VALUES:
                raise ConfigError(f"SamplingParams: {name}={kw[name]!r} is not supported by specoffload")
            else:
                raise ConfigError(f"SamplingParams: unknown parameter {name!r}")
        init(self, *args, **kw)

    __init__.__doc__ = init.__doc__
    cls.__init__ = __init__
    return cls


accept_vllm_names(SamplingParams)
