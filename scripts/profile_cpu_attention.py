"""Time the CPU attention of one verification layer: the target's KV cache in host memory,
`--queries` new tokens per sequence (k + 1) attending causally over `--keys` cached ones.

    python scripts/profile_cpu_attention.py --batch 48 --queries 12 --keys 640

Mixtral-8x7B's attention shape (32 query heads, 8 KV heads, head dim 128), bf16 cache, as the
CPU attention actor holds it. Prints the median milliseconds per layer over `--passes` passes.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--queries", type=int, default=12, help="new tokens per sequence (k + 1)")
    ap.add_argument("--keys", type=int, default=640, help="tokens per sequence after the pass")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--passes", type=int, default=12)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    a = ap.parse_args(argv)
    if min(a.batch, a.queries, a.layers, a.passes) < 1 or a.keys < a.queries:
        print("profile_cpu_attention: error: sizes must be >= 1 and --keys >= --queries", file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)

    from specoffload.models.attention import KVCache

    torch.manual_seed(0)
    B, Hq, Hkv, d, n = a.batch, 32, 8, 128, a.queries
    cache = KVCache(a.layers, B, Hkv, d, a.keys, torch.bfloat16)
    for t in cache.k + cache.v:
        t.normal_()
    q_lens = torch.full((B,), n)
    q, k, v = (torch.randn(B * n, h, d, dtype=torch.bfloat16) for h in (Hq, Hkv, Hkv))
    times = []
    for _ in range(a.passes + 1):  # the first pass warms up
        cache.lens.fill_(a.keys - n)
        cache.begin_pass(q_lens, B * n, n)
        t = time.perf_counter()
        for j in range(a.layers):
            cache.attend_layer(j, q, k, v)
        times.append((time.perf_counter() - t) / a.layers * 1e3)
        cache._pass = None
    times = sorted(times[1:])
    print(f"CPU attention, {B} sequences x {n} queries over {a.keys} keys, bf16, {torch.get_num_threads()} threads: "
          f"{times[len(times) // 2]:.1f} ms per layer (median of {a.passes} passes; min {times[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
