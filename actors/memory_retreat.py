"""Carrying on, smaller, after the GPU runs out of memory mid-run.

The planner's GPU account is an estimate: allocator fragments, the draft's graph pools and
passes whose shape changes with k are not all in it. A job of thousands of requests must not
end because one pass was a few MiB short (W1-long on the H200, session 30: 107 GPU rows filled
the account to 23.99 of 24 GiB, and a verification pass needed 64 MiB more after 212 of 768
requests had finished). When a pass or a merge raises `OutOfGpuMemoryMidRun`, the driver
(actors/supervisor.py) rebuilds the actor set as it does for a dead actor, with the footprint
`smaller` gives, and runs what had not finished; greedy requests continue from their tokens.
Errors at a run's start (a first prefill, the caches) are not retried: they say what to lower.
"""

from __future__ import annotations

from dataclasses import replace


def smaller(plan, run_cfg) -> tuple | None:
    """(plan, run_cfg, what changed) needing less GPU memory: half the GPU rows (their target KV
    is what the memory left beside the layers and the draft was spent on), or, with none, half
    the batch (its activations, draft cache and logits); None when the batch is one sequence."""
    rows = min(plan.gpu_kv_rows, run_cfg.batch_size)
    if rows > 0:
        return replace(plan, gpu_kv_rows=rows // 2), run_cfg, f"{rows // 2} GPU rows (was {rows})"
    b = run_cfg.batch_size
    if b < 2:
        return None
    half = b // 2
    return (replace(plan, batch_size=min(plan.batch_size, half)),
            replace(run_cfg, batch_size=half, refill_rows=min(run_cfg.refill_rows, half)),
            f"batch {half} (was {b})")
