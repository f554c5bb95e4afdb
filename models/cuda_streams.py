"""The engine's CUDA side streams: one per role and device, drawn once, never shared by roles.

`torch.cuda.Stream()` creates nothing: it hands out the next stream of a fixed pool (32 per
priority and device) in round robin. The draft's graph capture used to draw a fresh one for
every capture; after enough recaptures (a job's rows refilled over and over) it drew the weight
copier's stream again, so the feeder thread's copies and events landed inside the draft's
capture and the run failed ("operation not permitted on an event last recorded in a capturing
stream", w1-long on an H100 in session 33, after ~80 passes). Every side stream the engine uses
comes from here: drawn once per role, and redrawn if the pool hands back another role's.
Two users of one role in a process (two weight streamers, in tests) share its stream: their
work queues on it in order, as one engine's does.
"""

from __future__ import annotations

import threading

import torch

WEIGHT_COPY = "weight copy"  # actors/weight_stream.py: host-to-device layer copies (a feeder thread)
KV_COPY = "kv copy"  # actors/gpu_executor.py: prefill K/V out to the host ring
GRAPH_CAPTURE = "graph capture"  # speculation/draft_graph.py: capture must not run on the default stream
JOIN_PREFILL = "joining prefill"  # actors/gpu_executor.py: rows joining a pass prefill beside its parts
DRAFT_PRIMING = "draft priming"  # speculation/runner.py: joining rows' prompts through the draft, on a thread
EXECUTOR = "executor"  # actors/gpu_executor.py: its own work, at a higher priority than JOIN_PREFILL's

_lock = threading.Lock()
_streams: dict[tuple[int, str], torch.cuda.Stream] = {}


def side_stream(role: str, device, priority: int = 0) -> torch.cuda.Stream:
    """The stream `role` uses on `device` (a CUDA device), the same one at every call. priority:
    CUDA's, for the first call (0 is the default and the lowest; lower numbers go first where
    the device picks which stream's kernel runs next)."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _lock:
        s = _streams.get((index, role))
        if s is not None:
            return s
        taken = {x.cuda_stream for (i, _), x in _streams.items() if i == index}
        # A pool round holds 32 streams, and other code may draw from it meanwhile: one full
        # round and then some is enough to find a stream no role holds.
        for _ in range(64):
            s = torch.cuda.Stream(index, priority=priority)
            if s.cuda_stream not in taken:
                _streams[(index, role)] = s
                return s
        raise RuntimeError(f"no CUDA stream free for {role!r} on cuda:{index}: every pool stream drawn is "
                           f"another role's ({len(taken)} roles)")
