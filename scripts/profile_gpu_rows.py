"""Time the GPU rows' attention (actors/gpu_rows.py: `KVCache.attend_layer` on the device) alone,
at a workload's shapes, under each SDPA backend: once with one shape repeated (a pass's later
layers) and once with the key length one longer every call (a pass's first layer: the rows'
longest sequence grows every pass), wall time with the device synchronised, so host-side work
such as building a cuDNN execution graph counts.

Why: with GPU rows the executor's target time per layer rose ~10 ms on w1-long (64 rows) where
the arithmetic (64 rows x 9 queries over <= 1,280 keys, ~0.3 GB of K/V) says well under 1 ms
(docs/benchmarks.md, W1-long "Session 30"). The cause was cuDNN attention, which recent torch
tries first for masked bf16 calls on sm90 and which builds a graph per new shape
(models/attention.GPU_CUDNN_ATTENTION): 38.7 ms a call at a new key length against 0.62 ms
without it (session 32). The row "as the executor runs it" is what the engine
uses (models.attention.gpu_attention_backends).

    python scripts/profile_gpu_rows.py                          # w1-long: Mixtral heads, 64 rows
    python scripts/profile_gpu_rows.py --rows 48 --q-heads 64 --capacity 640 --n-q 5   # W4
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from specoffload.models import attention
from specoffload.models.attention import KVCache


def wall_ms(fn, reps: int, sync) -> float:
    """Median wall ms of fn over reps calls (after two warm-ups), the device drained around each."""
    for _ in range(2):
        fn()
    out = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
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
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    g = torch.Generator().manual_seed(0)
    cache = KVCache(1, a.rows, a.kv_heads, a.head_dim, a.capacity, dt, dev)
    grow = 2 * (a.reps + 2)  # key positions the growing case uses up
    lens = torch.randint(a.min_len, a.capacity - a.n_q - grow, (a.rows,), generator=g)
    for t in (cache.k[0], cache.v[0]):
        t.normal_()
    T = a.rows * a.n_q
    q = torch.randn(T, a.q_heads, a.head_dim, device=dev, dtype=dt)
    k = torch.randn(T, a.kv_heads, a.head_dim, device=dev, dtype=dt)
    v = torch.randn(T, a.kv_heads, a.head_dim, device=dev, dtype=dt)
    q_lens = torch.full((a.rows,), a.n_q, dtype=torch.long, device=dev)

    def same_shape():
        cache.attend_layer(0, q, k, v)

    def longer_each_call():
        cache.lens += 1  # the rows' longest sequence grows, as from one pass to the next
        cache.begin_pass(q_lens, T, a.n_q)
        cache.attend_layer(0, q, k, v)

    print(f"{a.rows} rows x {a.n_q} queries, {a.q_heads}/{a.kv_heads} heads x {a.head_dim}, "
          f"keys {int(lens.min())}-{int(lens.max()) + a.n_q} (capacity {a.capacity}), {torch.__version__}, "
          f"cuDNN {torch.backends.cudnn.version()}")
    print(f"{'backends':34s} {'same shape ms':>14s} {'longer each call ms':>20s}")
    cases = [("torch's default", None), ("as the executor runs it", "engine")]
    cases += [(b.name, b) for b in (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)]
    default_cudnn = torch.backends.cuda.cudnn_sdp_enabled()
    for name, b in cases:
        torch.backends.cuda.enable_cudnn_sdp(default_cudnn)
        if b == "engine":
            attention.gpu_attention_backends()
        ctx = sdpa_kernel([b]) if isinstance(b, SDPBackend) else contextlib.nullcontext()
        cache.lens.copy_(lens)
        cache.begin_pass(q_lens, T, a.n_q)
        try:
            with ctx:
                same = wall_ms(same_shape, a.reps, sync)
                longer = wall_ms(longer_each_call, a.reps, sync)
            print(f"{name:34s} {same:14.3f} {longer:20.3f}")
        except RuntimeError as e:
            print(f"{name:34s} refused: {str(e).splitlines()[0][:90]}")
    if not cuda:
        return
    torch.backends.cuda.enable_cudnn_sdp(default_cudnn)
    cache.lens.copy_(lens)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            longer_each_call()
        sync()
    print("torch's default, longer each call, 5 calls:")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=10, max_name_column_width=60))


if __name__ == "__main__":
    main()
