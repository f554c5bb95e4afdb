"""Fit before load: check host memory before the loader writes a byte.

The I/O loader puts every target layer not left on disk, and the globals, into /dev/shm; the CPU
attention worker then holds the target's KV cache in ordinary memory. A run that does not fit
used to fail part way through loading (the kernel killing a process, or a full /dev/shm). Here,
before any actor starts: weights against free /dev/shm, weights + KV cache against MemAvailable.
What does not fit goes to the disk tier (plan.disk_layers: read from the checkpoint each pass,
the last layers first, as the planner places them), or, where even that cannot fit, the run
stops with a one-line error naming the numbers.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import replace

from ..errors import CapacityError
from .plan import Plan

GiB = 2**30
# Left free in MemAvailable for the actors' processes, Ray's object store and the OS.
HOST_RESERVE = 2 * GiB
# Tokens per sequence the KV cache is sized for at load time when the run's prompts are not yet
# known (LLM(...) started before any prompt; each generate call checks its own requests again).
# W1 in this engine: 640.
LOAD_CONTEXT = 1024


def host_memory() -> tuple[int, int]:
    """(free bytes in /dev/shm, MemAvailable); tests patch this."""
    from .hardware import mem_available

    try:
        shm = shutil.disk_usage("/dev/shm").free
    except OSError:
        shm = mem_available()
    return shm, mem_available()


def kv_bytes(spec, plan: Plan, sequences: int, context: int) -> int:
    import torch

    itemsize = torch.empty((), dtype=getattr(torch, plan.kv_dtype or spec.dtype)).element_size()
    return sequences * context * spec.kv_bytes_per_token // spec.torch_dtype.itemsize * itemsize


def fit_before_load(spec, plan: Plan, sequences: int, context: int, keep: int = 0, quiet: bool = False) -> Plan:
    """`plan`, or a copy with more layers on disk so that host memory holds the rest.

    sequences x context: the target KV cache to make room for; keep: the first layers that must
    stay in host memory (a self-speculative draft's)."""
    from .cost_model import glob_bytes

    layer = [spec.layer_bytes(j) for j in range(spec.num_layers)]
    glob = glob_bytes(spec)
    kv = kv_bytes(spec, plan, sequences, context)
    shm_free, avail = host_memory()

    def need(disk: set) -> int:
        return sum(b for j, b in enumerate(layer) if j not in disk) + glob

    def fits(disk: set) -> bool:
        w = need(disk)
        return w <= shm_free and w + kv + HOST_RESERVE <= avail

    disk = set(plan.disk_layers)
    if fits(disk):
        return plan
    movable = [j for j in reversed(range(spec.num_layers))
               if j not in disk and j not in plan.gpu_layers and j >= keep]
    for j in movable:
        disk.add(j)
        if fits(disk):
            new = replace(plan, disk_layers=tuple(sorted(disk)))
            if not quiet:
                print(f"specoffload: host memory holds {spec.num_layers - len(disk)} of {spec.num_layers} target "
                      f"layers beside a {kv / GiB:.1f} GiB KV cache; {len(disk)} stay on disk, read each pass",
                      file=sys.stderr)
            return new
    w = need(set(plan.disk_layers))
    raise CapacityError(
        f"host memory too small: the target's {spec.num_layers - len(plan.disk_layers)} layers in host memory need "
        f"{w / GiB:.1f} GiB of /dev/shm ({shm_free / GiB:.1f} GiB free) and, with a {kv / GiB:.1f} GiB KV cache "
        f"({sequences} sequences x {context} tokens) and {HOST_RESERVE / GiB:.0f} GiB reserve, "
        f"{(w + kv + HOST_RESERVE) / GiB:.1f} GiB of MemAvailable ({avail / GiB:.1f} GiB); with every movable "
        f"layer on disk it would still need {(need(disk) + kv + HOST_RESERVE) / GiB:.1f} GiB: lower batch_size "
        f"or free memory")


def fit_for_llm(spec, plan: Plan, schedule: str, draft_desc, workload=None, progress: bool = True,
                context: int | None = None) -> Plan:
    """`fit_before_load` for an LLM about to start its actors (llm.py's hook): a batch (two for
    the dual schedule) of `context` tokens (the checked prompts' longest), else the workload's
    length, else LOAD_CONTEXT, and a self-speculative draft's layers kept in host memory."""
    seqs = plan.batch_size * (2 if schedule == "dual" else 1)
    ctx = context or (workload.prompt_len + workload.gen_len if workload is not None else LOAD_CONTEXT)
    keep = int(draft_desc[1]) if draft_desc and draft_desc[0] == "self" else 0
    return fit_before_load(spec, plan, seqs, min(ctx, spec.max_positions), keep, quiet=not progress)


def fit_fallbacks(spec, fallbacks: list, draft_desc, workload=None, context: int | None = None) -> list:
    """The same for --plan auto's fallbacks, (Plan, RunConfig, candidate) each; one that cannot
    fit is dropped (the coordinator only tries those with the first plan's disk layers anyway)."""
    out = []
    for p, cfg, c in fallbacks:
        try:
            out.append((fit_for_llm(spec, p, cfg.schedule, draft_desc, workload, False, context), cfg, c))
        except CapacityError:
            pass
    return out
