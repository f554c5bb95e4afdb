"""The executor's GPU memory: the cap it runs under, and what each part of its startup took.

A cap of N GiB covers this process's CUDA context as well as what PyTorch allocates, so the
cap given to PyTorch's allocator is N minus the context measured here
(set_per_process_memory_fraction limits the allocator alone). The context is this process's
own: the card's use read through NVML before it is created and after (no context needed for
that), so memory other processes hold on a shared card is not counted against the cap; it is
checked instead against what the card has free. Without NVML, everything on the card that
this allocator does not hold counts as context (the cautious reading). Each startup part
(draft, globals, resident layers, weight slots) is loaded inside `part(name)`: running out of
memory there is one CapacityError line with the figures, not a CUDA traceback.
"""

from __future__ import annotations

import ctypes
import os
import time
from contextlib import contextmanager

import torch

from ..errors import CapacityError

GiB = 2**30


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


class _NvmlMemory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class _NvmlProcess(ctypes.Structure):  # nvmlProcessInfo_v2_t
    _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong), ("gpuInstanceId", ctypes.c_uint),
                ("computeInstanceId", ctypes.c_uint)]


def _nvml_handle(index: int):
    """(NVML library, handle) of CUDA device `index`, or None where NVML is missing or the card
    cannot be told apart (several cards and a CUDA_VISIBLE_DEVICES that is not a list of
    indices). NVML needs no CUDA context."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        if nvml.nvmlInit_v2() != 0:
            return None
        count = ctypes.c_uint()
        if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            return None
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if count.value == 1:
            nv_index = 0
        elif visible is None:
            nv_index = index
        else:
            ids = [v.strip() for v in visible.split(",") if v.strip()]
            if index >= len(ids) or not ids[index].isdigit():
                return None
            nv_index = int(ids[index])
        handle = ctypes.c_void_p()
        if nvml.nvmlDeviceGetHandleByIndex_v2(nv_index, ctypes.byref(handle)) != 0:
            return None
        return nvml, handle
    except (OSError, AttributeError):
        return None


def card_used(index: int) -> int | None:
    """Bytes in use on CUDA device `index` by every process (NVML), or None."""
    h = _nvml_handle(index)
    mem = _NvmlMemory()
    if h is None or h[0].nvmlDeviceGetMemoryInfo(h[1], ctypes.byref(mem)) != 0:
        return None
    return int(mem.used)


def process_used(index: int, pid: int) -> int | None:
    """Bytes this pid holds on CUDA device `index` (NVML's process list), or None where NVML
    does not list it (in a container with its own process ids it often cannot)."""
    h = _nvml_handle(index)
    if h is None:
        return None
    try:
        n = ctypes.c_uint(64)
        procs = (_NvmlProcess * 64)()
        if h[0].nvmlDeviceGetComputeRunningProcesses_v2(h[1], ctypes.byref(n), procs) != 0:
            return None
    except AttributeError:
        return None
    for p in procs[:n.value]:
        if p.pid == pid and p.usedGpuMemory < 2**63:  # NVML_VALUE_NOT_AVAILABLE is all ones
            return int(p.usedGpuMemory)
    return None


class GpuBudget:
    def __init__(self, device: torch.device, cap: int | None):
        self.cuda = device.type == "cuda"
        if self.cuda and device.index is None:  # torch's fraction and NVML calls need the index
            device = torch.device("cuda", torch.cuda.current_device())
        self.device, self.cap = device, cap
        self.parts: dict[str, int] = {}
        self.seconds: dict[str, float] = {}  # each part's load time: where a slow start goes
        self.context, self.others, self.context_source = 0, 0, "none"
        self.total = 0  # the card's memory (none off CUDA: `summary` says so)
        if not self.cuda:
            return
        index = device.index
        before = card_used(index)  # other processes' memory, read before this one has a context
        torch.empty(1, device=device)  # creates the context
        after = card_used(index)
        free, total = torch.cuda.mem_get_info(device)
        reserved = torch.cuda.memory_reserved(device)
        self.total = total
        own = process_used(index, os.getpid())
        if own is not None and after is not None:  # exact: NVML lists this process
            self.context, self.others = max(own - reserved, 0), max(after - own, 0)
            self.context_source = "nvml process"
        elif before is not None and after is not None and after - before > 32 * 2**20:
            # (a smaller change: this process had its context already, and the reading says nothing)
            # Another process allocating in that instant would count here: the creation takes
            # a fraction of a second, and the count errs towards a smaller cap, never a larger.
            self.context, self.others = max(after - before - reserved, 0), before
            self.context_source = "nvml card"
        else:  # what this allocator does not hold: ours and, unknowably apart, other processes'
            self.context, self.others = max(total - free - reserved, 0), 0
            self.context_source = "card"
        if cap:
            allow = cap - self.context
            if allow <= 0:
                raise CapacityError(f"gpu_memory {_gib(cap)} GiB is less than the CUDA context "
                                    f"({_gib(self.context)} GiB, {self.context_source})")
            if allow - reserved > free:
                raise CapacityError(f"gpu_memory {_gib(cap)} GiB does not fit this GPU: {_gib(free)} GiB of "
                                    f"{_gib(total)} is free, other processes hold {_gib(self.others)} GiB; "
                                    f"lower gpu_memory or free the GPU")
            # Enforced, not advisory: allocations past the cap raise out-of-memory.
            torch.cuda.set_per_process_memory_fraction(min(allow / total, 1.0), device)

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.cuda else 0

    def summary(self) -> str:
        done = ", ".join(f"{k} {_gib(v)}" for k, v in self.parts.items())
        cap = f"cap {_gib(self.cap)} GiB" if self.cap else f"card {_gib(self.total)} GiB" if self.cuda else "no GPU"
        others = f" (other processes {_gib(self.others)} GiB)" if self.others else ""
        return f"{cap}{others}: CUDA context {_gib(self.context)}" + (f", {done}" if done else "")

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
        return {"context": self.context, "context_source": self.context_source, "others": self.others,
                "parts": dict(self.parts),
                "allocated": torch.cuda.memory_allocated(self.device),
                "max_allocated": torch.cuda.max_memory_allocated(self.device),
                "max_reserved": peak, "peak_in_use": self.context + peak, "cap": self.cap,
                # allocations that hit the cap, freed the allocator's cache and tried again: each
                # a device-wide synchronisation and fresh cudaMallocs (a stall inside a pass)
                "alloc_retries": torch.cuda.memory_stats(self.device).get("num_alloc_retries", 0)}
