"""Time the resident draft's decode step (Mistral-7B shape by default) per batch/window/KV dtype.

Builds a random-weight draft on the device, prefills a batch through `SpecRunner` exactly as
the executor does, then times rounds of k draft steps with CUDA events and wall clock; each
configuration can also run one more round under torch.profiler (`--profile`, top kernels
printed). A table of milliseconds per draft step comes last.

    python scripts/profile_draft.py --configs 192:128:fp8,192:128:fp8:eager --k 6
    python scripts/profile_draft.py --layers 8 --draft-fp8 --sinks 4 --configs 192:64:fp8,192:64:fp8:nofeed \
        --full-accept 0.3 --k 8      # rounds where 30% of rows accept every proposal, as in w1-long
    python scripts/profile_draft.py --layers 2 --configs 4:8:bf16 --prompt-len 16   # CPU smoke test
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--configs", default="192:128:fp8,192:128:bf16,96:128:fp8",
                    help="comma list of batch:window:kv[:eager][:nofeed] (kv = fp8 or bf16; window 0 = full "
                         "context; eager = no CUDA graphs for the one-token steps; nofeed = the draft does not feed "
                         "itself its last proposal, SpecRunner.feed_last)")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--sinks", type=int, default=0, help="attention sinks kept beside a window")
    ap.add_argument("--draft-fp8", action="store_true", help="the draft's layer matrices in fp8 (models/fp8_weights.py)")
    ap.add_argument("--full-accept", type=float, default=0.0,
                    help="share of rows whose every proposal the target accepts each round (the rest accept none); "
                         "those rows start the next round with two pending tokens unless the draft fed d_k")
    ap.add_argument("--join", type=int, default=0,
                    help="then time rows joining the batch three times: N rows leave, N new prompts start "
                         "(the draft's priming, SpecRunner.start) and merge, and the next round runs (a recapture)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler table for every configuration's last round")
    a = ap.parse_args(argv)

    from specoffload.sources.constructed import mistral_7b
    from specoffload.sources.random_weights import RandomWeights
    from specoffload.models.resident import ResidentModel
    from specoffload.speculation.runner import SpecRunner
    from specoffload.speculation.sampler import SamplingTensors

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    spec = mistral_7b(a.layers)
    t = time.perf_counter()
    draft = ResidentModel.from_source(RandomWeights(spec), dev, fp8_weights=a.draft_fp8)
    print(f"draft of {a.layers} layers{' (fp8 matrices)' if a.draft_fp8 else ''} on {dev} in "
          f"{time.perf_counter() - t:.1f} s, {draft.weight_bytes() / 2**30:.2f} GiB", flush=True)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    rows = []
    for i, c in enumerate(a.configs.split(",")):
        B, W, kv, *rest = c.split(":")
        B, W = int(B), int(W) or None
        eager, nofeed = "eager" in rest, "nofeed" in rest
        runner = SpecRunner(draft, dev, window=W, fp8=kv == "fp8", prefill_chunk=32, graphs=not eager,
                            sinks=a.sinks if W else 0, feed_last=False if nofeed else None)
        full = torch.arange(B, device=dev) < round(a.full_accept * B)  # these rows accept every proposal
        g = torch.Generator().manual_seed(i)
        prompts = torch.randint(3, spec.vocab_size, (B, a.prompt_len), generator=g).tolist()
        samp = SamplingTensors(np.zeros(B, np.float32), np.zeros(B, np.int64), np.ones(B, np.float32))
        t = time.perf_counter()
        runner.start(0, samp, prompts, a.prompt_len + 4 * (a.k + 1) * (a.rounds + 2))
        runner.finish(0, torch.randn(B, 1, spec.vocab_size, device=dev), 0, None, np.zeros(B, np.float32), first=True)
        sync()
        prefill_s = time.perf_counter() - t
        u = np.zeros((B, a.k), np.float32)
        step_ms = []
        prof = None
        for r in range(a.rounds + 1 + a.profile):  # round 0 warms up; a profiled round is extra
            if r == a.rounds + 1:
                from torch.profiler import ProfilerActivity, profile

                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
                prof = profile(activities=acts)
                prof.__enter__()
            sync()
            t = time.perf_counter()
            runner.propose(0, a.k, u)
            sync()
            if 0 < r <= a.rounds:
                step_ms.append((time.perf_counter() - t) / a.k * 1e3)
            # The target rejects everything (random logits) but in the --full-accept rows, which
            # take every proposal; the draft's rollback runs as in a real round.
            logits = torch.randn(B, a.k + 1, spec.vocab_size, device=dev)
            props = runner.batches[0].proposals
            logits[:, :a.k].scatter_(2, props[:, :, None], torch.where(full, 1e4, -1e4)[:, None, None].expand(B, a.k, 1))
            runner.finish(0, logits, a.k, None, u[:, :1])
            if prof is not None:
                prof.__exit__(None, None, None)
        join = _joins(runner, a, spec, dev, sync, B, g, u, float(np.mean(step_ms)) * a.k) if a.join else None
        mem = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else 0.0
        rows.append((B, W or "full", kv + (" eager" if eager else "") + (" nofeed" if nofeed else ""), prefill_s,
                     float(np.mean(step_ms)), float(np.min(step_ms)), mem, join))
        print(f"B={B} W={W} kv={kv}: prefill {prefill_s:.2f} s, draft step {np.mean(step_ms):.2f} ms "
              f"(min {np.min(step_ms):.2f}), peak {mem:.1f} GiB", flush=True)
        if prof is not None:
            key = "self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=key, row_limit=25), flush=True)
            n_kernels = sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")
            print(f"kernels launched in one round of {a.k} steps: {n_kernels} ({n_kernels / a.k:.0f} per step)")
        runner.free(0)
        del runner
        if dev == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    print(f"\ndraft: Mistral-7B shape, {a.layers} layers, {dev}, prompt {a.prompt_len}, k {a.k}, "
          f"rows accepting every proposal {a.full_accept:.0%}")
    print(f"{'batch':>5} {'window':>6} {'kv':>17} {'prefill s':>9} {'ms/step':>8} {'min ms':>7} {'peak GiB':>8}"
          + (f" {'join start ms':>13} {'merge ms':>8} {'round after ms':>14}" if a.join else ""))
    for B, W, kv, p, m, mn, mem, join in rows:
        print(f"{B:5d} {str(W):>6} {kv:>17} {p:9.2f} {m:8.2f} {mn:7.2f} {mem:8.1f}"
              + (" {:13.1f} {:8.1f} {:14.1f}".format(*join) if join else ""))
    return 0


def _joins(runner, a, spec, dev, sync, B, g, u, round_ms):
    """Median ms of three joins of a.join rows (w1-long: ~20 rows a join): the new rows' start
    (cache and priming), their merge into the batch, and the batch's next round (which
    captures its draft step again) less a steady round's time."""
    from specoffload.speculation.sampler import SamplingTensors

    n, out = a.join, []
    for rep in range(3):
        runner.keep(0, np.arange(n, B, dtype=np.int64))  # n rows finished
        prompts = torch.randint(3, spec.vocab_size, (n, a.prompt_len), generator=g).tolist()
        samp = SamplingTensors(np.zeros(n, np.float32), np.zeros(n, np.int64), np.ones(n, np.float32))
        sync()
        t = time.perf_counter()
        runner.start(1, samp, prompts, a.prompt_len + 4 * (a.k + 1) * (a.rounds + 2), joins=0)
        sync()
        t1 = time.perf_counter()
        runner.finish(1, torch.randn(n, 1, spec.vocab_size, device=dev), 0, None, np.zeros(n, np.float32), first=True)
        sync()
        t2 = time.perf_counter()
        runner.merge(0, 1)
        sync()
        t3 = time.perf_counter()
        runner.propose(0, a.k, u)
        sync()
        t4 = time.perf_counter()
        runner.finish(0, torch.randn(B, a.k + 1, spec.vocab_size, device=dev), a.k, None, u[:, :1])
        out.append(((t1 - t) * 1e3, (t3 - t2) * 1e3, (t4 - t3) * 1e3 - round_ms))
    return tuple(float(x) for x in np.median(np.array(out), axis=0))


if __name__ == "__main__":
    sys.exit(main())
