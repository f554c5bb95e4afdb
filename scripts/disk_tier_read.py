"""How fast the disk tier stages a layer: the checked read (read_layer: safetensors tensors,
dtype, stack, finiteness) against the direct read (pread of the file's bytes into the staging
buffer, on several threads), on one checkpoint's layers, from the page cache after a warm-up
read (what a second pass sees when the files fit RAM). `--drop-cache` asks the kernel to drop
the checkpoint's pages before every round (posix_fadvise DONTNEED after a sync, no root
needed), so the reads come from the disk itself: what the disk tier gets when the model does
not fit RAM, which is when the planner uses it.

    python scripts/random_checkpoint.py --shape mixtral-8x7b --layers 2 --out /tmp/mixtral2
    python scripts/disk_tier_read.py /tmp/mixtral2 --layers 0,1 --repeat 3 [--drop-cache]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def drop_cache(folder: Path):
    """Evict the checkpoint's pages from the page cache (clean pages only: sync first)."""
    for f in folder.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Time the disk tier's checked and direct layer reads.")
    ap.add_argument("model", help="a checkpoint folder")
    ap.add_argument("--layers", default="0", help="comma list of layers to stage (default 0)")
    ap.add_argument("--repeat", type=int, default=3, help="reads of each layer per path (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="reader threads of the direct path "
                                                               "(default: the disk tier's own)")
    ap.add_argument("--drop-cache", action="store_true", help="drop the checkpoint's pages from the page cache "
                                                              "before every round: read from the disk itself")
    a = ap.parse_args(argv)
    if a.drop_cache:
        os.sync()
    from specoffload.actors.disk_tier import DiskTier

    layers = [int(x) for x in a.layers.split(",")]
    tier = DiskTier(("checkpoint", a.model, None), layers, cuda=False, read_threads=a.threads)
    rows = []
    try:
        for path in ("checked", "direct"):
            if path == "checked":
                saved, tier._direct = tier._direct, lambda j: None
                tier.extents.clear()
            else:
                tier._direct = saved
                for j in layers:
                    tier.extents[j] = tier._direct(j)
                if any(tier.extents[j] is None for j in layers):
                    print(f"direct reads do not apply to {a.model} (another dtype, fp8 or fused experts)")
                    break
            for j in layers:  # warm the page cache / first use
                tier.get(j)
                tier.done_with(j)
            n0, t0, dropping = tier.bytes_read, time.perf_counter(), 0.0
            for _ in range(a.repeat):
                if a.drop_cache:  # not timed: the kernel's eviction is not the disk tier's cost
                    t = time.perf_counter()
                    drop_cache(Path(a.model))
                    dropping += time.perf_counter() - t
                for j in layers:
                    tier.get(j)
                    tier.done_with(j)
            dt, nb = time.perf_counter() - t0 - dropping, tier.bytes_read - n0
            rows.append((path, nb / 2**30, dt, nb / dt / 1e9, dt / (a.repeat * len(layers))))
    finally:
        tier.close()
    print(f"{os.cpu_count()} cores, reader threads {tier.readers._max_workers}, "
          f"{'from the disk (page cache dropped each round)' if a.drop_cache else 'from the page cache'}")
    print(f"{'path':<8} {'GiB':>7} {'s':>7} {'GB/s':>6} {'s/layer':>8}")
    for r in rows:
        print(f"{r[0]:<8} {r[1]:7.2f} {r[2]:7.2f} {r[3]:6.2f} {r[4]:8.3f}")
    if len(rows) == 2:
        print(f"direct / checked: {rows[0][2] / rows[1][2]:.1f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
