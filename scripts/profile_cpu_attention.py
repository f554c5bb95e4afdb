"""Time the CPU attention of one verification layer: the target's KV cache in host memory,
`--queries` new tokens per sequence (k + 1) attending causally over `--keys` cached ones.

    python scripts/profile_cpu_attention.py --batch 48 --queries 12 --keys 640

Mixtral-8x7B's attention shape (32 query heads, 8 KV heads, head dim 128), bf16 cache, as the
CPU attention actor holds it. Prints the median milliseconds per layer over `--passes` passes of
- "engine": what the worker does, attention written straight into the output buffer it sends
  back (a mailbox's `out`, actors/mailbox.py);
- "engine + copy": attention into a fresh tensor, then copied into that buffer;
- "sdpa enable_gqa": SDPA's `enable_gqa` on packed queries, then the copy;
all in the same run, pass by pass, and the ratios. `--variants` adds candidate kernels, timed the
same way (`--heads 64,8` for a Llama-70B-shaped layer):
- "float-mask": the engine's SDPA call with the pass's mask made additive once, not per call;
- "fp32", "fp16": SDPA over a cache held in that type (the output cast back to bf16);
- "bmm": two batched matrix products per KV head and a float32 softmax, no SDPA;
- "bmm-fp32": the same over a float32 cache;
- "split-rows": the engine's call with each K/V head's query rows in calls of 32, so torch's
  kernel does not repack K/V once a head has 64 rows (`--queries 8 --heads 64,8`); the engine
  itself splits blocks of 64+ rows (`attention.CPU_QUERY_ROWS`, 63);
- "one-call": the engine's call with no split at all (what it did before session 23);
- "fp8-kv", "int8-kv": a cache held in 8 bits (float8 e4m3, or int8) with a scale per row, head
  and token, widened to bf16 a few rows at a time (so the widened copy stays in cache) before
  the engine's SDPA call: whether a narrower host KV, half the bytes read, pays for its widening
  (#20's larger batches);
- "huge-pages", "small-pages": the engine's call over a fresh copy of the cache advised into
  2 MiB pages (plan.kv_huge_pages, models/huge_pages.py), and over a fresh copy made as the
  worker makes it without the advice (the control): whether page size alone moves CPU
  attention (W4's first run in a process attended 18-28% slower than its second; use
  `--layers` large enough that the cache is well past the CPU's caches).
Each path's minor page faults per layer are printed beside its time; `--keep-freed-memory`
runs the whole profile with glibc keeping freed memory as the worker can (host_malloc.py), so two
runs, one with it, say what re-faulting each layer's temporaries costs.
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
    ap.add_argument("--heads", default="32,8", help="query heads,KV heads (head dim 128)")
    ap.add_argument("--variants", default="", help="a comma list of extra kernels to time: float-mask, fp32, "
                                                   "fp16, bmm, bmm-fp32, split-rows, one-call, fp8-kv, int8-kv, "
                                                   "huge-pages, small-pages, or all")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="glibc keeps freed memory for the whole run (host_malloc.keep_freed_memory)")
    a = ap.parse_args(argv)
    if min(a.batch, a.queries, a.layers, a.passes) < 1 or a.keys < a.queries:
        print("profile_cpu_attention: error: sizes must be >= 1 and --keys >= --queries", file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.keep_freed_memory:
        from specoffload.host_malloc import keep_freed_memory
        print(f"glibc keeps freed memory: {keep_freed_memory()}")

    import torch.nn.functional as F

    from specoffload.models.attention import KVCache, append_kv, causal_mask

    torch.manual_seed(0)
    Hq, Hkv = (int(x) for x in a.heads.split(","))
    B, d, n = a.batch, 128, a.queries
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
    cache.lens.copy_(lens)
    cache.begin_pass(q_lens, B * n, n)
    for j in range(a.layers):  # the pass's new K/V in the cache before the candidates copy it
        engine(j)
    cache._pass = None
    funcs.update(_variants(a.variants, cache, q, b_idx, i_idx, mask, sent, Hq, Hkv, n))
    from specoffload.memory_facts import minor_faults
    times = {name: [] for name in funcs}
    faults = {name: [] for name in funcs}
    for p in range(a.passes + 1):  # the first pass warms up; the paths alternate pass by pass
        for name, f in funcs.items():
            cache.lens.copy_(lens)
            cache.begin_pass(q_lens, B * n, n)
            f0, t = minor_faults(), time.perf_counter()
            for j in range(a.layers):
                f(j)
            if p:
                times[name].append((time.perf_counter() - t) / a.layers * 1e3)
                faults[name].append((minor_faults() - f0) / a.layers)
            cache._pass = None
    med = {}
    for name, ts in times.items():
        ts = sorted(ts)
        med[name] = ts[len(ts) // 2]
        print(f"{name:16} {med[name]:7.1f} ms per layer (median of {a.passes} passes; min {ts[0]:.1f}), "
              f"{sum(faults[name]) / len(faults[name]):.0f} minor faults per layer (mean)", flush=True)
    want = sdpa_gqa(0).clone()
    cache.lens.copy_(lens)
    cache.begin_pass(q_lens, B * n, n)
    same = torch.equal(engine(0), want)
    cache._pass = None
    for name in list(funcs)[3:]:  # the candidates: how far each lands from the engine, and how fast
        err = (funcs[name](0).float() - want.float()).abs().max().item()
        print(f"{name:16} {med['engine'] / med[name]:5.2f}x the engine; max |difference| {err:.4f}")
    e, c, s = med["engine"], med["engine + copy"], med["sdpa enable_gqa"]
    print(f"CPU attention, {B} sequences x {n} queries over {a.keys} keys, bf16, {torch.get_num_threads()} threads: "
          f"engine {e:.1f} ms, engine + copy {c:.1f} ms ({c / e:.2f}x), enable_gqa {s:.1f} ms ({s / e:.2f}x) "
          f"per layer; identical output: {same}")
    return 0


def _variants(names, cache, q, b_idx, i_idx, mask, sent, Hq, Hkv, n) -> dict:
    """Candidate kernels over the same queries and cache contents; each writes `sent`."""
    import torch.nn.functional as F

    from specoffload.memory_facts import anon_huge_bytes
    from specoffload.models import huge_pages
    from specoffload.models.attention import grouped_attention, grouped_mask

    want = {x for x in names.split(",") if x}
    if "all" in want:
        want = {"float-mask", "fp32", "fp16", "bmm", "bmm-fp32", "split-rows", "one-call", "fp8-kv", "int8-kv",
                "huge-pages", "small-pages"}
    B, G, d = cache.batch, Hq // Hkv, q.shape[-1]
    gm = grouped_mask(mask, G)  # [B, 1, G * n, n_k]
    add = torch.zeros(gm.shape, dtype=torch.float32).masked_fill_(~gm, float("-inf"))
    copies = {}

    def qg(dtype):  # [B, Hkv, G * n, d], head h = kv * G + g as the engine lays it out
        return q.view(B, n, Hq, d).permute(0, 2, 1, 3).reshape(B, Hkv, G * n, d).to(dtype)

    def put(res):  # [B, Hkv, G * n, d] -> the packed [B * n, Hq * d] output
        sent.view(B, n, Hq, d).copy_(res.reshape(B, Hq, n, d).transpose(1, 2))
        return sent

    def cache_in(dtype):
        if dtype not in copies:
            copies[dtype] = ([t.to(dtype) for t in cache.k], [t.to(dtype) for t in cache.v])
        return copies[dtype]

    def sdpa(dtype, m):
        ks, vs = cache_in(dtype) if dtype != torch.bfloat16 else (cache.k, cache.v)
        return lambda j: put(F.scaled_dot_product_attention(qg(dtype), ks[j], vs[j], attn_mask=m))

    def bmm(dtype):
        ks, vs = cache_in(dtype) if dtype != torch.bfloat16 else (cache.k, cache.v)
        scale = d ** -0.5

        def f(j):
            s = torch.matmul(qg(dtype), ks[j].transpose(-1, -2)).float().mul_(scale).add_(add)
            return put(torch.matmul(torch.softmax(s, -1).to(dtype), vs[j]))
        return f

    def engine_rows(max_rows):  # the engine's call with its own query-row limit (0: none)
        return lambda j: grouped_attention(q, cache.k[j], cache.v[j], gm, n, b_idx, i_idx, out=sent,
                                           max_rows=max_rows)

    def narrow(dtype, top):  # 8-bit K/V with a bf16 scale per (row, head, token)
        out = []
        for t in (*cache.k, *cache.v):
            sc = t.float().abs().amax(-1, keepdim=True).clamp_min(1e-8) / top
            q8 = (t.float() / sc)
            out.append(((q8.round() if dtype == torch.int8 else q8).to(dtype), sc.to(torch.bfloat16)))
        L = len(cache.k)
        return out[:L], out[L:]

    def eight_bit(dtype, top, rows=4):
        ks, vs = narrow(dtype, top)

        def f(j):
            (k8, sk), (v8, sv), qq = ks[j], vs[j], qg(torch.bfloat16)
            res = torch.empty_like(qq)
            for a in range(0, B, rows):
                b = min(B, a + rows)
                kk, vv = k8[a:b].to(torch.bfloat16) * sk[a:b], v8[a:b].to(torch.bfloat16) * sv[a:b]
                res[a:b] = F.scaled_dot_product_attention(qq[a:b], kk, vv, attn_mask=gm[a:b])
            return put(res)
        return f

    def fresh(huge: bool):  # the cache copied into new memory, advised into 2 MiB pages or not
        before = anon_huge_bytes()
        ks, vs = ([huge_pages.zeros(t.shape, t.dtype, "cpu", huge).copy_(t) for t in ts] for ts in (cache.k, cache.v))
        grew, total = (anon_huge_bytes() or 0) - (before or 0), sum(t.numel() * t.element_size() for t in ks + vs)
        print(f"{'huge-pages' if huge else 'small-pages':16} {grew / 2**30:.2f} of its {total / 2**30:.2f} GiB "
              f"in huge pages", flush=True)
        return lambda j: grouped_attention(q, ks[j], vs[j], gm, n, b_idx, i_idx, out=sent)

    table = {"huge-pages": lambda: fresh(True), "small-pages": lambda: fresh(False),
             "split-rows": lambda: engine_rows(32), "one-call": lambda: engine_rows(0),
             "fp8-kv": lambda: eight_bit(torch.float8_e4m3fn, 448.0),
             "int8-kv": lambda: eight_bit(torch.int8, 127.0),
             "float-mask": lambda: sdpa(torch.bfloat16, add.to(torch.bfloat16)),
             "fp32": lambda: sdpa(torch.float32, gm), "fp16": lambda: sdpa(torch.float16, gm),
             "bmm": lambda: bmm(torch.bfloat16), "bmm-fp32": lambda: bmm(torch.float32)}
    return {name: table[name]() for name in sorted(want)}


if __name__ == "__main__":
    sys.exit(main())
