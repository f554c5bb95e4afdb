"""Time one prefill layer of W4's target (a Llama-3.1-70B shape, fp8 quantized as the loader
does) on the executor's device, the way `GPUExecutor._prefill_layer` runs it: norm, q/k/v,
attention over a sub-batch's padded prompts, output projection, dense FFN; at several dense-FFN
chunk sizes (`models.layers.DENSE_CHUNK_BYTES`, the intermediate made at once).

    python scripts/profile_prefill_layer.py --rows 16 --prompt 512 --chunk-mib 64 256 1024

Prints per chunk size the median milliseconds of a layer, its TFLOP/s (matmuls only), the peak
memory it allocated above its inputs, and the largest output difference against the first
chunk size; then, for the first and the last size, the ten costliest kernels (torch.profiler).
`--before` adds each size with the input quantization as it was before session 20 (q/k/v and
gate/up each quantizing their input, in two kernels): the same outputs, and the time saved.
`--fused` adds each size with the elementwise work fused (plan.fused_prefill, models/fused.py;
compiled at its warm-up): "max diff vs first" says whether it is bit for bit on this device.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16, help="prompts in the sub-batch (plan.prefill_batch)")
    ap.add_argument("--prompt", type=int, default=512, help="tokens per prompt")
    ap.add_argument("--chunk-mib", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--bf16", action="store_true", help="the layer in bf16 instead of fp8")
    ap.add_argument("--before", action="store_true",
                    help="also time each chunk size as before session 20: every matrix quantizing its "
                         "input itself (fp8_weights.SHARE_INPUTS off), in two steps (x / s, then fp8)")
    ap.add_argument("--fused", action="store_true",
                    help="also time each chunk size with the elementwise work fused (plan.fused_prefill)")
    a = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("profile_prefill_layer: error: needs a CUDA device", file=sys.stderr)
        return 2
    if min(a.rows, a.prompt, a.repeats, *a.chunk_mib) < 1:
        print("profile_prefill_layer: error: counts must be >= 1", file=sys.stderr)
        return 2
    from specoffload.models import fp8_weights, layers
    from specoffload.models.attention import KVCache, gpu_attention_backends
    from specoffload.models.forward import Forward
    from specoffload.models.fused import FUSED
    from specoffload.models.fp8_weights import Fp8Weight, gathered
    from specoffload.sources.constructed import ConstructedModel
    from specoffload.sources.fp8_quantize import TARGET_MATRICES
    from specoffload.sources.w4_shapes import llama_3_1_70b

    dev = torch.device("cuda")
    gpu_attention_backends()  # the SDPA backends the executor allows, so attention times match
    spec = llama_3_1_70b(1)
    w = ConstructedModel(spec, 1, 1.0, False).read_layer(0)
    if not a.bf16:
        w = {k: Fp8Weight.quantize(v) if k in TARGET_MATRICES else v for k, v in w.items()}
    w = {k: v.to(dev) for k, v in gathered(w).items()}
    T, P, L = a.rows * a.prompt, a.rows, a.prompt
    q_lens = torch.full((P,), L, dtype=torch.long)
    pos = torch.arange(L).repeat(P).to(dev)
    cos, sin = layers.rope_cos_sin(spec, pos, spec.torch_dtype)
    g = torch.Generator(device=dev).manual_seed(0)
    h0 = torch.randn(T, spec.hidden_size, generator=g, device=dev).to(spec.torch_dtype)
    # matmul FLOPs of a layer: 2 x parameters x tokens
    flops = 2 * T * sum(v.data.numel() if isinstance(v, Fp8Weight) else (v.numel() if v.dim() == 2 else 0)
                        for v in w.values())

    def layer(fused: bool = False):
        cache = KVCache(1, P, spec.num_kv_heads, spec.head_dim, L, spec.torch_dtype, dev, (None,))
        cache.begin_pass(q_lens, T, L)
        f = Forward(spec, None, h0.clone(), cos, sin, FUSED if fused else None)
        f.layer(w, partial(cache.attend_layer, 0))
        return f.h

    rows, outs = [], {}
    runs = [(mib, True, False) for mib in a.chunk_mib]  # (chunk MiB, shared input quantization, fused)
    runs += [(mib, False, False) for mib in a.chunk_mib] if a.before else []
    runs += [(mib, True, True) for mib in a.chunk_mib] if a.fused else []
    for mib, now, fused in runs:
        layers.DENSE_CHUNK_BYTES = layers.DENSE_CHUNK_MAX_BYTES = mib << 20  # exactly this chunk
        fp8_weights.SHARE_INPUTS = now
        if now:  # today's one-kernel quantization, or the two steps it replaced
            fp8_weights._DIV_INTO_FP8_FAILED.discard("cuda")
        else:
            fp8_weights._DIV_INTO_FP8_FAILED.add("cuda")
        out = layer(fused)  # warm-up (with --fused: compiles)
        outs.setdefault(mib, out)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        times = []
        for _ in range(a.repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            layer(fused)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
        ms = statistics.median(times) * 1e3
        diff = (out.float() - outs[a.chunk_mib[0]].float()).abs().max().item()
        name = f"{mib}, fused" if fused else mib if now else f"{mib}, as before"
        rows.append((name, ms, flops / (ms / 1e3) / 1e12, peak, diff))
    fp8_weights.SHARE_INPUTS = True
    fp8_weights._DIV_INTO_FP8_FAILED.discard("cuda")
    if fp8_weights._SCALED_MM_FAILED:
        print(f"NOTE: torch._scaled_mm refused {fp8_weights._SCALED_MM_FAILED}: widened bf16 weights ran")
    for mib in dict.fromkeys((a.chunk_mib[0], a.chunk_mib[-1])):
        layers.DENSE_CHUNK_BYTES = layers.DENSE_CHUNK_MAX_BYTES = mib << 20
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            layer()
            torch.cuda.synchronize()
        print(f"\nchunk {mib} MiB, costliest kernels:")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10, max_name_column_width=60))
    print(f"\n{torch.cuda.get_device_name(dev)}; Llama-3.1-70B layer in {'bf16' if a.bf16 else 'fp8'}, "
          f"{P} prompts x {L} tokens ({T} tokens), {flops / 1e12:.1f} TFLOP of matmuls")
    print("| chunk MiB | ms / layer | TFLOP/s | peak MiB | max diff vs first |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for mib, ms, tf, peak, diff in rows:
        print(f"| {mib} | {ms:.2f} | {tf:.0f} | {peak:.0f} | {diff:.3g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
