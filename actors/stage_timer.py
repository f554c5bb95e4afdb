"""Time spent per stage, without synchronising the device, and an optional timeline.

On CUDA each span records a pair of events on a stream and is summed once both have
completed; on the CPU it is wall time. Busy time over wall time is the GPU busy fraction the
metrics report. With `trace=True` every span is also kept as a Chrome-trace event; CUDA
event times are placed on the wall clock through one reference event recorded at start.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class StageTimer:
    def __init__(self, device, role: str = "worker", trace: bool = False):
        self.cuda = torch.device(device).type == "cuda"
        self.role, self.trace = role, trace
        self.totals = defaultdict(float)
        self.pending = []
        self.events: list[dict] = []
        self.t0 = time.perf_counter()
        if self.cuda:
            self.ref = torch.cuda.Event(enable_timing=True)
            self.ref.record()
            self.ref.synchronize()
            self.ref_wall = time.time()

    def _keep(self, stage, label, start, end):
        if self.trace:
            self.events.append({"name": label or stage, "cat": stage, "ph": "X", "ts": start * 1e6,
                                "dur": max(end - start, 0.0) * 1e6, "pid": self.role, "tid": stage})

    @contextmanager
    def span(self, stage: str, label: str = ""):
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            yield
            b.record()
            self.add_pair(stage, label, a, b)
        else:
            with self.host_span(stage, label):
                yield

    @contextmanager
    def host_span(self, stage: str, label: str = ""):
        """Wall time of host-side work (waiting for the device, staging data), on any device."""
        t = time.time()
        yield
        t2 = time.time()
        self.totals[stage] += t2 - t
        self._keep(stage, label, t, t2)

    def add_pair(self, stage: str, label: str, a, b):
        """A span delimited by two CUDA events recorded by the caller (e.g. on a copy stream)."""
        self.pending.append((stage, label, a, b))
        if len(self.pending) > 4096:
            self.collect()

    def collect(self) -> dict:
        if self.cuda:
            keep = []
            for stage, label, a, b in self.pending:
                if b.query():
                    self.totals[stage] += a.elapsed_time(b) / 1000
                    if self.trace:
                        start = self.ref_wall + self.ref.elapsed_time(a) / 1000
                        self._keep(stage, label, start, self.ref_wall + self.ref.elapsed_time(b) / 1000)
                else:
                    keep.append((stage, label, a, b))
            self.pending = keep
        out = {f"{k}_s": v for k, v in self.totals.items()}
        out["wall_s"] = time.perf_counter() - self.t0
        return out

    def take_events(self) -> list[dict]:
        self.collect()
        ev, self.events = self.events, []
        return ev
