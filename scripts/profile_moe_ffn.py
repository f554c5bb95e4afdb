"""Time one MoE FFN layer of a Mixtral-8x7B shape on the executor's device: the grouped path
(`torch._grouped_mm` over expert-sorted tokens, in chunks; no host read) against the expert loop
(reads per-expert counts on the host, one launch chain per expert), same inputs, same run.

    python scripts/profile_moe_ffn.py --tokens 2304 8192        # CUDA if present, bf16

Prints per token count the median milliseconds of each path, their ratio, the largest
difference between their outputs, and the peak memory each path allocated above its inputs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[2304, 8192])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    a = ap.parse_args(argv)
    if min(a.tokens) < 1 or a.repeats < 1:
        print("profile_moe_ffn: error: --tokens and --repeats must be >= 1", file=sys.stderr)
        return 2
    from specoffload.models import layers
    from specoffload.sources.constructed import mixtral_8x7b

    if not hasattr(torch, "_grouped_mm"):
        print("profile_moe_ffn: error: this torch has no torch._grouped_mm", file=sys.stderr)
        return 2
    dev, dt = torch.device(a.device), torch.bfloat16
    spec = replace(mixtral_8x7b(1), hidden_size=a.hidden, intermediate_size=a.intermediate)
    E, H, I = spec.num_experts, a.hidden, a.intermediate
    g = torch.Generator(device=dev).manual_seed(0)
    r = lambda *s: (torch.randn(*s, generator=g, device=dev) * 0.02).to(dt)  # noqa: E731
    w = {"router": r(E, H) * 50, "w_gate": r(E, I, H), "w_up": r(E, I, H), "w_down": r(E, H, I)}
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows = []
    for T in a.tokens:
        x = r(T, H) * 50
        res, out = {}, {}
        for name, grouped in (("grouped", True), ("loop", False)):
            out[name] = layers.moe_ffn(spec, w, x, grouped=grouped)  # warm-up
            if dev.type == "cuda":
                sync()
                torch.cuda.reset_peak_memory_stats(dev)
                base = torch.cuda.memory_allocated(dev)
            times = []
            for _ in range(a.repeats):
                sync()
                t0 = time.perf_counter()
                layers.moe_ffn(spec, w, x, grouped=grouped)
                sync()
                times.append((time.perf_counter() - t0) * 1e3)
            peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**20 if dev.type == "cuda" else float("nan")
            res[name] = (statistics.median(times), peak)
        diff = (out["grouped"].float() - out["loop"].float()).abs().max().item()
        scale = out["loop"].float().abs().max().item()
        rows.append((T, res["grouped"], res["loop"], diff, scale))
    print(f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}), bf16, "
          f"E={E} H={H} I={I} top-{spec.experts_per_token}, chunk {layers.MOE_CHUNK_BYTES >> 20} MiB")
    print("| tokens | grouped ms | loop ms | loop / grouped | grouped peak MiB | loop peak MiB | max diff (of max) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for T, (gm, gp), (lm, lp), diff, scale in rows:
        print(f"| {T} | {gm:.2f} | {lm:.2f} | {lm / gm:.2f}x | {gp:.0f} | {lp:.0f} | {diff:.3g} ({scale:.3g}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
