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
