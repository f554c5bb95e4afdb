"""Settings of one run that the coordinator follows (a planner may later choose them)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..scheduler.schedule import SCHEDULES


@dataclass(frozen=True)
class RunConfig:
    schedule: str = "none"  # "none" (no speculation), "single" or "dual"
    k: int = 4  # draft tokens per round (the start value when adaptive)
    k_max: int = 8
    adaptive_k: bool = False
    batch_size: int = 64  # sequences per batch (dual: per each of the two batches)
    # none/single: waiting requests start as a new batch that joins the running batches'
    # target passes once `refill_rows` rows have finished (0: a quarter of batch_size); off by
    # default, as in EngineArgs (why: there)
    refill: bool = False
    refill_rows: int = 0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 1 <= self.k <= 16:
            raise ConfigError(f"draft length k must be in 1..16, got {self.k}")
        if not self.k <= self.k_max <= 16:
            raise ConfigError(f"k_max must be in k..16, got {self.k_max}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.refill_rows <= self.batch_size:
            raise ConfigError(f"refill_rows must be in 0..batch_size, got {self.refill_rows}")
        if self.refill_rows == 0:
            object.__setattr__(self, "refill_rows", max(1, self.batch_size // 4))

    @property
    def speculative(self) -> bool:
        return self.schedule != "none"
