"""Doorbells: a pass's per-layer hand-offs signalled in the mailbox's shared memory.

Without them each layer's hand-off is a Ray dependency: the executor's call for layer j+1
takes the CPU worker's result for layer j as an argument, so Ray's submitter (the
coordinator) hears the worker finish and only then sends the executor its call, and the
same the other way. Those messages are the gaps around attention in a layer's chain
(docs/benchmarks.md: 2.8-12.7 ms each on a W1 layer, against ~30 ms of attention; doorbells
took 5.9 ms off each W4-small verification layer).

With doorbells (`Plan.layer_doorbell`) every call of a pass is queued at its actor up front;
layer 0's hand-off stays a Ray dependency (it carries the mailbox's name and the pass's
shapes) and so do the last layer's outputs (they carry the verification's arguments), but in
between each side waits on a counter in the mailbox's first bytes:
- the executor bumps `QKV` after its q/k/v are in the mailbox (its stream synchronized);
- the worker waits for `QKV` to pass what it consumed, attends, and sets `OUT` to it;
- the executor waits for `OUT` to reach what it posted before it reads the output.
The counters only grow and each mailbox serves one micro-batch, whose calls alternate, so a
counter's value names the layer. x86's store order makes the data visible before the
counter that follows it (the targets this engine runs on; another ISA would need fences).

A side that fails sets `FAILED`, and a waiter also checks every second that its peer's
process is alive (both write their pid here), so a failure or a killed actor ends the pass's
queued calls at once instead of leaving them waiting (they raise `PeerFailed`; the actor
backend reports the first real error of the pass instead).
"""

from __future__ import annotations

import os
import time

import torch

from ..errors import SpecOffloadError

QKV, OUT, FAILED, EXECUTOR_PID, WORKER_PID = range(5)
WORDS = 8  # int64s in the header (one cache line)
BELL = "bell"  # the argument a call gets instead of its peer's result: wait on the doorbell
SPIN_S = 200e-6  # poll without sleeping this long (a hand-off is usually this close)
SLEEP_S = 50e-6  # then sleep this long between polls: the waiter's core goes to attention
LIVENESS_S = 1.0  # how often a waiter checks that its peer's process is still there


class PeerFailed(SpecOffloadError):
    """The other side of a pass failed (its own error is the one to report) or its process died."""

    def __init__(self, *args):
        super().__init__(*args)
        self._specoffload_logged = True  # a consequence: guard.record keeps only the real error


def is_peer_failed(err: BaseException) -> bool:
    """err, or the actor error Ray wraps it in, is a PeerFailed."""
    return isinstance(err, PeerFailed) or isinstance(getattr(err, "cause", None), PeerFailed)


def header(buf: torch.Tensor):
    """The counters at the start of a mailbox's bytes, as a numpy int64 view (a read is ~100 ns)."""
    return buf[: WORDS * 8].view(torch.int64).numpy()


def fail(bell):
    """Mark the pass failed, so the calls the peer has queued stop waiting."""
    if bell is not None:
        bell[FAILED] = 1


def wait(bell, slot: int, value: int, peer_slot: int, what: str) -> float:
    """Block until bell[slot] >= value; returns the seconds waited. Raises PeerFailed if the
    pass was marked failed (checked first: a counter a failed call left behind may already
    read as the value, and the data is then not this call's) or the peer's process is gone."""
    t0 = time.perf_counter()
    check = t0 + LIVENESS_S
    while True:
        if bell[FAILED]:
            raise PeerFailed(f"{what}: the other side of the pass failed")
        if bell[slot] >= value:
            return time.perf_counter() - t0
        now = time.perf_counter()
        if now - t0 > SPIN_S:
            time.sleep(SLEEP_S)
            if now > check:
                check = now + LIVENESS_S
                _alive(int(bell[peer_slot]), what)


def _alive(pid: int, what: str):
    if pid <= 0:
        return  # the peer has not mapped this mailbox yet
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise PeerFailed(f"{what}: the process on the other side (pid {pid}) is gone") from None
    except PermissionError:
        pass  # it exists
