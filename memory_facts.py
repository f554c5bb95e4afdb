"""How a process's host memory is backed: minor page faults so far, anonymous memory in huge
pages, and the machine's transparent huge page modes.

Why: on W4 (one H100, session 41) the same run was 218-236 tok/s first in its process and 255
second, its CPU attention 73.6 or 67.8 s against 57.6 (docs/benchmarks.md, W4 "Session 41").
Each run allocates its host KV cache afresh (30 GB there); whether that memory came in 2 MiB
pages or 4 KiB ones, and how many faults it took, is what these say per run. Linux /proc and
/sys only; elsewhere None.
"""

from __future__ import annotations

import resource


def minor_faults() -> int:
    """Minor page faults of this process so far (a first touch of anonymous memory is one)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def anon_huge_bytes() -> int | None:
    """This process's anonymous memory backed by transparent huge pages, in bytes."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def thp_modes() -> dict | None:
    """The transparent huge page settings, each its chosen value ("always", "madvise", "never"...):
    {"enabled": ..., "defrag": ...}."""
    out = {}
    for name in ("enabled", "defrag"):
        try:
            with open(f"/sys/kernel/mm/transparent_hugepage/{name}") as f:
                text = f.read()
        except OSError:
            return None
        chosen = [w[1:-1] for w in text.split() if w.startswith("[") and w.endswith("]")]
        out[name] = chosen[0] if chosen else text.strip()
    return out


# /proc/vmstat counters that say whether the kernel was reclaiming, compacting or collapsing
# memory while a run went on (a first run's host KV cache is made in memory that loading the
# weights just filled and freed, or that a checkpoint's page cache still holds): page scans by
# kswapd and by allocating processes themselves, compaction stalls, huge pages granted at
# fault, refused, or collapsed later by khugepaged, and swap traffic.
VM_COUNTERS = ("pgscan_kswapd", "pgscan_direct", "pgsteal_kswapd", "pgsteal_direct", "compact_stall",
               "thp_fault_alloc", "thp_fault_fallback", "thp_collapse_alloc", "pswpin", "pswpout")


def vm_counters() -> dict | None:
    """`VM_COUNTERS` from /proc/vmstat now (those the kernel has), or None off Linux."""
    try:
        with open("/proc/vmstat") as f:
            pairs = (line.split() for line in f)
            return {p[0]: int(p[1]) for p in pairs if len(p) == 2 and p[0] in VM_COUNTERS}
    except (OSError, ValueError):
        return None


def vm_between(first: dict | None, second: dict | None) -> dict | None:
    """What each counter grew by between two `vm_counters` samples (the machine's, every process)."""
    if first is None or second is None:
        return None
    return {k: second[k] - first[k] for k in VM_COUNTERS if k in first and k in second}
