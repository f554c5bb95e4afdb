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
    # With more requests than the batch: waiting requests take the rows of finished ones in
    # the running batch (refill in place) once `refill_rows` rows are free (0: the default of
    # placement/refill.py), instead of waves that each wait for their slowest row. Their prefill
    # rides the batch's next target pass ("pass") or runs as a prefill pass of its own ("own",
    # the plain path kept to test the other against). None: placement/refill.py decides.
    refill: bool | None = None
    refill_rows: int = 0
    refill_prefill: str = "pass"

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
        if self.refill_prefill not in ("pass", "own"):
            raise ConfigError(f"refill_prefill must be 'pass' or 'own', got {self.refill_prefill!r}")
        if self.refill_rows == 0:
            from ..placement.refill import default_refill_rows

            object.__setattr__(self, "refill_rows", default_refill_rows(self.batch_size, self.refill_prefill))

    @property
    def speculative(self) -> bool:
        return self.schedule != "none"
