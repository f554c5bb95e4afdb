"""Time the GPU rows' attention (actors/gpu_rows.py: `KVCache.attend_layer` on the device) alone,
at a workload's shapes, under each SDPA backend, with the top kernels of the default one.

Why: with GPU rows the executor's target time per layer rose ~10 ms on w1-long (64 rows) where
the arithmetic (64 rows x 9 queries over <= 1,280 keys, ~0.3 GB of K/V) says well under 1 ms
(docs/benchmarks.md, W1-long "Session 30"). This says whether the attention itself is that cost.

    python scripts/profile_gpu_rows.py                          # w1-long: Mixtral heads, 64 rows
    python scripts/profile_gpu_rows.py --rows 48 --q-heads 64 --capacity 640 --n-q 5   # W4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from specoffload.models.attention import KVCache


def timed(fn, reps: int, cuda: bool) -> float:
    """Median ms of fn over reps calls (after two warm-ups): device time on CUDA, else wall."""
    for _ in range(2):
        fn()
    out = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--capacity", type=int, default=1280)
    ap.add_argument("--min-len", type=int, default=128)
    ap.add_argument("--n-q", type=int, default=9, help="queries per row (k + 1)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of this script, not a measurement")
    a = ap.parse_args(argv)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev, dt = torch.device(a.device), torch.bfloat16
    cuda = dev.type == "cuda"
    g = torch.Generator().manual_seed(0)
    cache = KVCache(1, a.rows, a.kv_heads, a.head_dim, a.capacity, dt, dev)
    lens = torch.randint(a.min_len, a.capacity - a.n_q, (a.rows,), generator=g)
    cache.lens.copy_(lens)
    for t in (cache.k[0], cache.v[0]):
        t.normal_()
    T = a.rows * a.n_q
    q = torch.randn(T, a.q_heads, a.head_dim, device=dev, dtype=dt)
    k = torch.randn(T, a.kv_heads, a.head_dim, device=dev, dtype=dt)
    v = torch.randn(T, a.kv_heads, a.head_dim, device=dev, dtype=dt)
    q_lens = torch.full((a.rows,), a.n_q, dtype=torch.long, device=dev)

    def begin():
        cache.begin_pass(q_lens, T, a.n_q)

    def layer():
        cache.attend_layer(0, q, k, v)

    begin()
    print(f"{a.rows} rows x {a.n_q} queries, {a.q_heads}/{a.kv_heads} heads x {a.head_dim}, "
          f"keys {int(lens.min())}-{int(lens.max()) + a.n_q} (capacity {a.capacity})")
    print(f"begin_pass (once a pass)            {timed(begin, a.reps, cuda):7.3f} ms")
    rows = [("attend_layer, default backends", None)]
    rows += [(f"attend_layer, {b.name}", b) for b in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                                                      SDPBackend.MATH)]
    for name, b in rows:
        try:
            if b is None:
                ms = timed(layer, a.reps, cuda)
            else:
                with sdpa_kernel([b]):
                    ms = timed(layer, a.reps, cuda)
            print(f"{name:36s}{ms:7.3f} ms")
        except RuntimeError as e:
            print(f"{name:36s} refused: {str(e).splitlines()[0][:90]}")
    if not cuda:
        return
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            layer()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=60))


if __name__ == "__main__":
    main()
