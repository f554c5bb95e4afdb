"""Time the CPU attention of one verification layer: the target's KV cache in host memory,
`--queries` new tokens per sequence (k + 1) attending causally over `--keys` cached ones.

    python scripts/profile_cpu_attention.py --batch 48 --queries 12 --keys 640

Mixtral-8x7B's attention shape (32 query heads, 8 KV heads, head dim 128), bf16 cache, as the
CPU attention actor holds it. Prints the median milliseconds per layer over `--passes` passes of
- "engine": what the worker does, attention written straight into the output buffer it sends
  back (a mailbox's `out`, actors/mailbox.py);
- "engine + copy": attention into a fresh tensor, then copied into that buffer;
- "sdpa enable_gqa": SDPA's `enable_gqa` on packed queries, then the copy;
all in the same run, pass by pass, and the ratios.
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

    import torch.nn.functional as F

    from specoffload.models.attention import KVCache, append_kv, causal_mask

    torch.manual_seed(0)
    B, Hq, Hkv, d, n = a.batch, 32, 8, 128, a.queries
    cache = KVCache(a.layers, B, Hkv, d, a.keys, torch.bfloat16)
    for t in cache.k + cache.v:
        t.normal_()
    q_lens = torch.full((B,), n)
    q, k, v = (torch.randn(B * n, h, d, dtype=torch.bfloat16) for h in (Hq, Hkv, Hkv))
    lens = torch.full((B,), a.keys - n)
    b_idx, i_idx = torch.arange(B).repeat_interleave(n), torch.arange(n).repeat(B)
    mask = causal_mask(lens, q_lens, n, a.keys)

    sent = torch.empty(B * n, Hq * d, dtype=torch.bfloat16)  # the buffer the output leaves in

    def engine(j):
        return cache.attend_layer(j, q, k, v, out=sent)

    def engine_copy(j):
        return sent.copy_(cache.attend_layer(j, q, k, v))

    def sdpa_gqa(j):  # the earlier path: packed queries, SDPA's own grouped-query handling
        append_kv(cache.k[j], cache.v[j], k, v, lens, q_lens, b_idx, i_idx)
        qp = q.new_zeros(B, n, Hq, d)
        qp[b_idx, i_idx] = q
        out = F.scaled_dot_product_attention(qp.transpose(1, 2), cache.k[j], cache.v[j], attn_mask=mask,
                                             enable_gqa=True)
        return sent.copy_(out.transpose(1, 2)[b_idx, i_idx].reshape(B * n, Hq * d))

    funcs = {"engine": engine, "engine + copy": engine_copy, "sdpa enable_gqa": sdpa_gqa}
    times = {name: [] for name in funcs}
    for p in range(a.passes + 1):  # the first pass warms up; the paths alternate pass by pass
        for name, f in funcs.items():
            cache.lens.copy_(lens)
            cache.begin_pass(q_lens, B * n, n)
            t = time.perf_counter()
            for j in range(a.layers):
                f(j)
            if p:
                times[name].append((time.perf_counter() - t) / a.layers * 1e3)
            cache._pass = None
    med = {}
    for name, ts in times.items():
        ts = sorted(ts)
        med[name] = ts[len(ts) // 2]
        print(f"{name:16} {med[name]:7.1f} ms per layer (median of {a.passes} passes; min {ts[0]:.1f})", flush=True)
    want = sdpa_gqa(0).clone()
    cache.lens.copy_(lens)
    cache.begin_pass(q_lens, B * n, n)
    same = torch.equal(engine(0), want)
    cache._pass = None
    e, c, s = med["engine"], med["engine + copy"], med["sdpa enable_gqa"]
    print(f"CPU attention, {B} sequences x {n} queries over {a.keys} keys, bf16, {torch.get_num_threads()} threads: "
          f"engine {e:.1f} ms, engine + copy {c:.1f} ms ({c / e:.2f}x), enable_gqa {s:.1f} ms ({s / e:.2f}x) "
          f"per layer; identical output: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
