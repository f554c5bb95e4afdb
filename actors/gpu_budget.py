"""The executor's GPU memory: the cap it runs under, and what each part of its startup took.

A card of N GiB holds the CUDA context as well as what PyTorch allocates, so the cap given to
PyTorch's allocator is N minus the context measured here (set_per_process_memory_fraction
limits the allocator alone). Each startup part (draft, globals, resident layers, weight
slots) is loaded inside `part(name)`: running out of memory there is one CapacityError line
with the figures, not a CUDA traceback.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from ..errors import CapacityError

GiB = 2**30


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


class GpuBudget:
    def __init__(self, device: torch.device, cap: int | None):
        self.device, self.cap = device, cap
        self.cuda = device.type == "cuda"
        self.parts: dict[str, int] = {}
        self.seconds: dict[str, float] = {}  # each part's load time: where a slow start goes
        self.context = 0
        if not self.cuda:
            return
        torch.empty(1, device=device)  # creates the context
        free, total = torch.cuda.mem_get_info(device)
        # What this process's allocator does not hold: its context and cuBLAS handles, and
        # whatever other processes keep on the card (on a shared card, also not ours to use).
        self.context = max(total - free - torch.cuda.memory_reserved(device), 0)
        self.total = total
        if cap:
            allow = cap - self.context
            if allow <= 0:
                raise CapacityError(f"gpu_memory {_gib(cap)} GiB is less than the CUDA context and other "
                                    f"processes already take on this GPU ({_gib(self.context)} GiB)")
            # Enforced, not advisory: allocations past the cap raise out-of-memory.
            torch.cuda.set_per_process_memory_fraction(min(allow / total, 1.0), device)

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.cuda else 0

    def summary(self) -> str:
        done = ", ".join(f"{k} {_gib(v)}" for k, v in self.parts.items())
        cap = f"cap {_gib(self.cap)} GiB" if self.cap else f"card {_gib(self.total)} GiB"
        return f"{cap}: CUDA context {_gib(self.context)}" + (f", {done}" if done else "")

    @contextmanager
    def part(self, name: str):
        """Load one part of the startup; its bytes are recorded, running out is a CapacityError."""
        before, t0 = self.allocated(), time.perf_counter()
        try:
            yield
        except torch.OutOfMemoryError:
            got = self.allocated() - before
            raise CapacityError(
                f"the plan does not fit the GPU: out of memory loading the {name} ({_gib(got)} GiB loaded "
                f"of it; {self.summary()} GiB in use before): lower the resident layers, weight slots or "
                f"batch size, use an fp8 draft, raise gpu_memory, or let --plan auto choose") from None
        except CapacityError as e:
            raise CapacityError(f"{e} ({self.summary()} GiB in use)") from None
        self.parts[name] = self.allocated() - before
        self.seconds[name] = round(time.perf_counter() - t0, 1)

    def report(self) -> dict:
        """Bytes: the context, each part, and the peak the allocator has reserved since start."""
        if not self.cuda:
            return {}
        peak = torch.cuda.max_memory_reserved(self.device)
        return {"context": self.context, "parts": dict(self.parts),
                "allocated": torch.cuda.memory_allocated(self.device),
                "max_allocated": torch.cuda.max_memory_allocated(self.device),
                "max_reserved": peak, "peak_in_use": self.context + peak, "cap": self.cap}
