"""Time the elementwise work of a W4 prefill layer (a Llama-3.1-70B shape, fp8), group by
group, as the engine runs it (eager: several kernels each) and fused by `torch.compile`, and
say whether the fused output is bit for bit the eager one: fused with eager's roundings
(inductor's `emulate_precision_casts`, which keeps the engine's output as it is) and with
intermediates kept in fp32 inside each kernel (inductor's default; not the same bits).

Why: a W4 prefill sub-batch layer (8 prompts x 512 tokens) took a median 10.9 ms on the device
in session 37, of which the fp8 matmuls are ~5.7 ms (1,240 TFLOP/s, session 32's
`profile_prefill_layer.py --rows 8`) and elementwise kernels ~2.5; prefill is 22.85 s of W4's
106.7 (issue 19's goal, 250 tok/s, needs 98.3). Each group below reads and writes a
[tokens, width] tensor several times in eager mode; one fused kernel reads and writes it once.
The last lines add up what fusing saves a layer (each group as often as a layer runs it).
`plan.fused_prefill` (`bench --fused-prefill 1,0`) runs them fused with eager's roundings;
`profile_prefill_layer.py --fused` times a whole layer both ways.

    python scripts/profile_prefill_fusion.py                      # W4: 4,096 tokens, chunks as the engine's
    python scripts/profile_prefill_fusion.py --device cpu --tokens 64 --hidden 256 --intermediate 512 \
        --heads 8 --kv-heads 2 --head-dim 32                      # a smoke run on a CPU

Groups (the functions are the engine's own, `models/fused.py`, which plan.fused_prefill compiles):
- norm + quantize: `rms_norm` of the residual stream at a layer's start, then its per-token
  fp8 quantization (q/k/v's shared input);
- residual + norm + quantize: the attention projection added to the stream, then the same for
  gate/up's shared input;
- rope: `apply_rope` on q and k;
- act * up + quantize: the FFN's `silu(gate) * up` over one dense chunk, quantized for `down`.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens of a sub-batch (8 prompts x 512)")
    ap.add_argument("--hidden", type=int, default=8192)
    ap.add_argument("--intermediate", type=int, default=28672)
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args(argv)
    import torch

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("profile_prefill_fusion: error: no CUDA device (pass --device cpu for a smoke run)", file=sys.stderr)
        return 2
    if min(a.tokens, a.hidden, a.intermediate, a.heads, a.kv_heads, a.head_dim, a.repeats) < 1:
        print("profile_prefill_fusion: error: sizes and counts must be >= 1", file=sys.stderr)
        return 2
    from profile_gpu_rows import wall_ms  # the median wall time, device drained around each call

    from specoffload.models import fused as fz
    from specoffload.models.layers import dense_chunk_rows

    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    bf16 = torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g, device=dev).to(bf16)  # noqa: E731
    T, chunk = a.tokens, min(a.tokens, dense_chunk_rows(a.tokens, a.intermediate, 2))
    # The engine's groups (models/fused.py): eager, they are what a layer runs without the plan field.
    groups = [
        ("norm + quantize", fz._norm_q, (rand(T, a.hidden), rand(a.hidden), 1e-5)),
        ("residual + norm + quantize", fz._add_norm_q, (rand(T, a.hidden), rand(T, a.hidden), rand(a.hidden), 1e-5)),
        ("rope (q and k)", fz._rope, (rand(T, a.heads, a.head_dim), rand(T, a.kv_heads, a.head_dim),
                                      rand(T, a.head_dim), rand(T, a.head_dim))),
        (f"act * up + quantize ({chunk} rows)", fz._act_mul_q,
         ("silu", rand(chunk, a.intermediate), rand(chunk, a.intermediate))),
    ]

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    def ms(fn, args) -> float:
        return wall_ms(lambda: fn(*args), a.repeats, sync)

    def same(x, y) -> bool:
        bits = lambda t: t.view(torch.uint8) if t.element_size() == 1 else t  # noqa: E731 (fp8: compare bytes)
        return all(torch.equal(bits(p), bits(q)) for p, q in zip(x if isinstance(x, tuple) else (x,),
                                                                   y if isinstance(y, tuple) else (y,)))

    def compiled(fn, args, exact: bool):
        """fn fused by inductor as models/fused.py compiles it (exact: emulate_precision_casts,
        every intermediate rounded to its dtype as eager does), or with intermediates kept in
        fp32 inside the kernel (inductor's default)."""
        torch._dynamo.reset()  # a fresh compile for each variant, not the last one's cache
        t0 = time.perf_counter()
        fused_fn = torch.compile(fn, dynamic=True, options={"emulate_precision_casts": exact})
        out = fused_fn(*args)  # compiles here
        sync()
        return fused_fn, out, time.perf_counter() - t0

    rows = []
    with torch.inference_mode():
        for name, fn, args in groups:
            eager, ref = ms(fn, args), fn(*args)
            row = [name, eager]
            for exact in (True, False):
                fused_fn, out, compile_s = compiled(fn, args, exact)
                row += [ms(fused_fn, args), same(ref, out)]
                print(f"{name}: eager {eager:.3f} ms, fused ({'exact' if exact else 'fp32'} casts) {row[-2]:.3f} ms, "
                      f"compiled in {compile_s:.1f} s", flush=True)
            rows.append(row)
    where = torch.cuda.get_device_name(dev) if cuda else "CPU"
    print(f"\n{where}; {T} tokens, hidden {a.hidden}, intermediate {a.intermediate}, "
          f"{a.heads}/{a.kv_heads} heads of {a.head_dim}, bf16 in, fp8 quantized")
    print("| group | eager ms | fused, eager's casts: ms | bit for bit | fused, fp32 inside: ms | bit for bit |")
    print("| --- | ---: | ---: | --- | ---: | --- |")
    yes = lambda b: "yes" if b else "no"  # noqa: E731
    for name, eager, f1, e1, f2, e2 in rows:
        print(f"| {name} | {eager:.3f} | {f1:.3f} | {yes(e1)} | {f2:.3f} | {yes(e2)} |")
    n_chunks = -(-T // chunk)
    for col, what in ((2, "with eager's casts"), (4, "fp32 inside")):
        saved = [r[1] - r[col] for r in rows]
        print(f"fused {what}, a layer would save ~{saved[0] + saved[1] + saved[2] + saved[3] * n_chunks:.2f} ms "
              f"(its two norms, rope, and act * up for each of its {n_chunks} FFN chunk(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
