"""Where the draft's KV cache lives and what it holds: one frozen, self-checking value that
the planner, the CLI, the bench and the speculation engine all read.

`placement` is one of PLACEMENTS; `window` W: the draft attends over only the last W tokens
(its cache a ring), plus each sequence's first `sinks` tokens; `fp8` stores that ring in fp8.
No torch here: the CLI and the planner import it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import ConfigError

# name -> where the draft's KV lives (the CLI's help says it)
PLACEMENTS = {
    "gpu": "on the GPU for the whole run (default)",
    "host": "in host memory, visiting the GPU a prefill batch at a time each round",
    "recompute": "rebuilt every round from each sequence's tokens, a prefill batch at a time (the paper's "
                 "schedule when the draft KV of a whole batch does not fit)",
}


@dataclass(frozen=True)
class DraftKV:
    placement: str = "gpu"
    window: int | None = None
    sinks: int = 0
    fp8: bool = False

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"draft_kv must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        if self.window is not None and self.window < 1:
            raise ConfigError(f"draft_window must be >= 1 or None, got {self.window}")
        if self.fp8 and self.window is None:
            raise ConfigError("draft_kv_fp8 needs a draft_window")
        if self.sinks < 0 or (self.sinks and self.window is None):
            raise ConfigError(f"draft_sinks must be >= 0 and needs a draft_window, got {self.sinks}")

    # -- where it lives --------------------------------------------------------------------
    @property
    def on_gpu(self) -> bool:
        """The whole batch's cache stays on the device between rounds."""
        return self.placement == "gpu"

    @property
    def in_host_memory(self) -> bool:
        """The cache is kept in host memory and visits the device a chunk at a time."""
        return self.placement == "host"

    @property
    def rebuilt(self) -> bool:
        """No cache is kept between rounds: it is rebuilt from each sequence's tokens."""
        return self.placement == "recompute"

    def gpu_sequences(self, batch: int, chunk: int) -> int:
        """Sequences whose draft KV the device holds at once."""
        return batch if self.on_gpu else min(chunk, batch)

    def host_sequences(self, batch: int) -> int:
        """Sequences whose draft KV host memory holds."""
        return batch if self.in_host_memory else 0

    # -- how big it is ---------------------------------------------------------------------
    def tokens(self, context: int, new_per_pass: int) -> int:
        """Tokens kept per sequence: a ring of W + sinks (+ a pass's new tokens), or all."""
        return context if self.window is None else min(context, self.window + self.sinks + new_per_pass)

    def bytes_per_token(self, spec) -> int:
        """K plus V of one token over all the draft's layers (`spec`: the draft's ModelSpec)."""
        return 2 * spec.num_kv_heads * spec.head_dim * (1 if self.fp8 else spec.torch_dtype.itemsize) * spec.num_layers

    def bytes_per_sequence(self, spec, context: int, new_per_pass: int) -> int:
        return self.bytes_per_token(spec) * self.tokens(context, new_per_pass)

    # -- variants --------------------------------------------------------------------------
    def full_context(self) -> "DraftKV":
        """The same placement over every token (no window, sinks or fp8)."""
        return replace(self, window=None, sinks=0, fp8=False)

    def label(self) -> str:
        return self.placement if self.window is None else f"W{self.window}{' fp8' if self.fp8 else ''}"
