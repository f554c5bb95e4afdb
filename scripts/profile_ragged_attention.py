"""Time CPU attention over rows of different lengths: one call padded to the longest row
against `ragged_chunks`' ranges (models/attention.py), for several call costs.

    python scripts/profile_ragged_attention.py --batch 192 --queries 1,5 --lo 128 --hi 1280

Mixtral-8x7B's attention shape (32 query heads, 8 KV heads, head dim 128), bf16 cache, as the
CPU attention actor holds it; row lengths drawn uniformly from [--lo, --hi] (w1-long's prompts
plus outputs), seeded. Prints, per query count, the median milliseconds per layer of each path
over --passes passes (paths alternate pass by pass), its ratio to the padded call, the calls
it makes and the share of the padded call's key positions it reads; then checks that every
path's output equals the padded one's.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=192)
    ap.add_argument("--queries", default="1,5", help="comma list of new tokens per sequence (k + 1)")
    ap.add_argument("--lo", type=int, default=128)
    ap.add_argument("--hi", type=int, default=1280)
    ap.add_argument("--call-keys", default="0,512,2048", help="comma list of RAGGED_CALL_KEYS to try")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--passes", type=int, default=4)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    a = ap.parse_args(argv)
    try:
        queries = [int(x) for x in a.queries.split(",")]
        call_keys = [int(x) for x in a.call_keys.split(",")]
    except ValueError:
        print("profile_ragged_attention: error: --queries and --call-keys take comma lists of integers", file=sys.stderr)
        return 2
    if min(a.batch, a.layers, a.passes, *queries) < 1 or not 1 <= a.lo <= a.hi or min(call_keys) < 0:
        print("profile_ragged_attention: error: sizes must be >= 1, 1 <= --lo <= --hi, call keys >= 0", file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)

    from specoffload.models import attention
    from specoffload.models.attention import KVCache, ragged_chunks

    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, d = a.batch, 32, 8, 128
    lens = torch.randint(a.lo, a.hi + 1, (B,), generator=g)
    cap = a.hi + max(queries)
    cache = KVCache(a.layers, B, Hkv, d, cap, torch.bfloat16)
    for t in cache.k + cache.v:
        t.normal_(generator=g)
    print(f"CPU attention, {B} rows of {a.lo}-{a.hi} keys (mean {lens.float().mean():.0f}, max {int(lens.max())}), "
          f"bf16, {torch.get_num_threads()} threads, ms per layer (median of {a.passes} passes)")
    print(f"{'queries':>7} {'path':>14} {'ms':>7} {'x padded':>8} {'calls':>5} {'keys read':>9} {'same':>5}", flush=True)
    ok = True
    for n in queries:  # each query count's rows print as soon as they are measured
        before = lens - n
        q_lens = torch.full((B,), n)
        q, k, v = (torch.randn(B * n, h, d, dtype=torch.bfloat16, generator=g) for h in (Hq, Hkv, Hkv))
        paths = {"padded": None, **{f"chunks@{c}": c for c in call_keys}}
        times = {p: [] for p in paths}
        outs = {}
        for p in range(a.passes + 1):  # the first pass warms up
            for name, c in paths.items():
                cache.ragged = c is not None
                if c is not None:
                    attention.RAGGED_CALL_KEYS = c
                cache.lens.copy_(before)
                cache.begin_pass(q_lens, B * n, n)
                t = time.perf_counter()
                for j in range(a.layers):
                    out = cache.attend_layer(j, q, k, v)
                if p:
                    times[name].append((time.perf_counter() - t) / a.layers * 1e3)
                outs[name] = out
                cache._pass = None
        med = {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}
        for name, c in paths.items():
            ch = ragged_chunks(lens.tolist(), c) if c is not None else [(0, B, int(lens.max()))]
            read = sum((b - lo) * m for lo, b, m in ch) / (B * int(lens.max()))
            same = torch.allclose(outs[name].float(), outs["padded"].float(), rtol=2e-2, atol=2e-2)
            ok &= same
            print(f"{n:>7} {name:>14} {med[name]:7.2f} {med['padded'] / med[name]:8.2f} {len(ch):5d} {read:9.2f} "
                  f"{str(same):>5}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
