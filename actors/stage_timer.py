"""Time spent per stage, without synchronising the device.

On CUDA each span records a pair of events on the current stream and is summed once both
have completed; on the CPU it is wall time. Busy time over wall time is the GPU busy
fraction the metrics report.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class StageTimer:
    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.totals = defaultdict(float)
        self.pending = []
        self.t0 = time.perf_counter()

    @contextmanager
    def span(self, stage: str):
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            yield
            b.record()
            self.pending.append((stage, a, b))
            if len(self.pending) > 4096:
                self.collect()
        else:
            t = time.perf_counter()
            yield
            self.totals[stage] += time.perf_counter() - t

    def collect(self) -> dict:
        if self.cuda:
            keep = []
            for stage, a, b in self.pending:
                if b.query():
                    self.totals[stage] += a.elapsed_time(b) / 1000
                else:
                    keep.append((stage, a, b))
            self.pending = keep
        out = {f"{k}_s": v for k, v in self.totals.items()}
        out["wall_s"] = time.perf_counter() - self.t0
        return out

    def reset(self):
        self.collect()
        self.totals.clear()
        self.t0 = time.perf_counter()
