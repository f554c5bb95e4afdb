"""`specoffload bench`: the W1 workload on the Ray actors, speculative modes against plain decoding.

A Mixtral-8x7B-shaped target streamed from host memory and a Mistral-7B-shaped draft on the
GPU (constructed pair, agreement a parameter; see sources/constructed.py), the GPU capped
(default 24 GiB). Each requested mode runs on the same actors in one process, on its own
random prompts of the same length; the table printed last gives tokens/s and its ratio to
mode "none" measured in the same run, seconds per target pass, weight-stream GB/s,
acceptance and GPU busy fraction.

    specoffload bench --workload w1 --modes none,single@6 --draft-window 128 --draft-kv-fp8
    specoffload bench --workload tiny          # seconds on a CPU, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from dataclasses import replace

import ray
import torch

from specoffload import host_facts, memory_facts
from specoffload.bench_settings import BenchError, RunSettings, SettingLists


WORKLOADS = {
    # name: (target layers, draft layers, batch, prompt length, tokens generated)
    "w1": (32, 32, 192, 512, 128),
    "w1-small": (8, 8, 192, 512, 32),
    # a batch job (bench_job.py): prompt length and tokens generated are the longest of each
    "w1-long": (8, 8, 192, 1024, 256),
    "w1-long-tiny": (1, 1, 4, 32, 12),
    "tiny": (2, 1, 4, 16, 6),
    # W3: a Qwen3-30B-A3B-shaped target (128 experts of 768, top-8) and a Qwen3-0.6B-shaped draft.
    "w3": (48, 28, 192, 512, 128),
    "w3-small": (12, 28, 192, 512, 32),
    "w3-tiny": (2, 1, 4, 16, 6),
    # W4: a Llama-3.1-70B-shaped target, always fp8 (quantized at load), and a Llama-3.2-1B-shaped draft.
    "w4": (80, 16, 192, 512, 128),
    "w4-small": (16, 16, 192, 512, 32),
}


def job_shape(a):
    """The job of a batch-job workload (None for the others: one prompt length, fixed outputs)."""
    from .bench_job import JobShape

    if a.workload == "w1-long":
        return JobShape(requests=a.requests or 768, prompt_hi=a.prompt_len, gen_hi=a.gen)
    if a.workload == "w1-long-tiny":
        return JobShape(requests=a.requests or 12, prompt_lo=8, prompt_hi=a.prompt_len, gen_lo=3, gen_hi=a.gen)
    return None


def workload_shapes(workload: str, target_layers: int, draft_layers: int):
    """(target spec, draft spec) of a workload's constructed pair."""
    if workload.startswith("w3"):
        from specoffload.sources.w3_shapes import qwen3_0_6b, qwen3_30b_a3b

        return qwen3_30b_a3b(target_layers), qwen3_0_6b(draft_layers)
    if workload.startswith("w4"):
        from specoffload.sources.w4_shapes import llama_3_1_70b, llama_3_2_1b

        return llama_3_1_70b(target_layers), llama_3_2_1b(draft_layers)
    from specoffload.sources.constructed import mistral_7b, mixtral_8x7b

    return mixtral_8x7b(target_layers), mistral_7b(draft_layers)


def parse_modes(text: str, k_default: int) -> dict:
    """'none,single@6,single@auto/m2,dual+recompute@4' -> {label: (schedule, k, adaptive, draft_kv, micro)};
    @auto starts at k and lets the loop choose k (1..16) from measured acceptance and timings;
    +recompute rebuilds the draft's KV every round (the paper's schedule), else it stays on the GPU;
    /mN runs that mode with N micro-batches per pass only (micro None: each of --micro-batches)."""
    from .placement.draft_kv import PLACEMENTS
    from .scheduler.schedule import SCHEDULES

    out = {}
    for label in text.split(","):
        label = label.strip()
        spec, _, mm = label.partition("/m")
        if mm and not (mm.isdigit() and 1 <= int(mm) <= 64):
            raise ValueError(f"micro-batch count in {label!r} must be 1..64")
        micro = int(mm) if mm else None
        mode, _, kk = spec.partition("@")
        mode, _, kv = mode.partition("+")
        kv = kv or "gpu"
        if mode not in SCHEDULES:
            raise ValueError(f"unknown mode {mode!r} in --modes (use {', '.join(SCHEDULES)}, optionally "
                             f"+recompute, @k or @auto)")
        if kv not in PLACEMENTS:
            raise ValueError(f"draft KV policy in {label!r} must be one of {', '.join(PLACEMENTS)}")
        if kk == "auto":
            out[label] = (mode, k_default, True, kv, micro)
        elif kk and not (kk.isdigit() and 1 <= int(kk) <= 16):
            raise ValueError(f"draft length in {label!r} must be 1..16 or 'auto'")
        else:
            out[label] = (mode, int(kk) if kk else k_default, False, kv, micro)
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="specoffload bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="w1",
                    help="w1: 32+32 layers, batch 192, prompt 512, 128 tokens; w1-small: 8+8 layers, "
                         "32 tokens; w1-long: 8+8 layers, a job of 768 requests, prompts 128-1024 tokens, "
                         "outputs 32-256 ended by EOS (w1-long-tiny: its CPU smoke test); tiny: 2+1 layers, 4 sequences of 16 tokens (a CPU smoke test); w3, "
                         "w3-small, w3-tiny: the same with Qwen3-30B-A3B / Qwen3-0.6B shapes (48+28, 12+28 "
                         "layers, 2+1); w4, w4-small: a Llama-3.1-70B-shaped target in fp8 (80 or 16 "
                         "layers) with a Llama-3.2-1B-shaped draft (16 layers). The options below override "
                         "its numbers.")
    ap.add_argument("--target-layers", type=int, help="The number of layers of the (Mixtral- or Qwen3-MoE-shaped) target "
                                                      "(default: the workload's).")
    ap.add_argument("--draft-layers", type=int, help="The number of layers of the (Mistral- or Qwen3-shaped) draft "
                                                     "(default: the workload's).")
    ap.add_argument("--batch", type=_batch_arg, help="The number of sequences per batch (default: the workload's), "
                                                     "or 'max': the most that host memory (and the GPU cap, for "
                                                     "the draft's KV) holds by the planner's account, with every "
                                                     "target layer in host memory.")
    ap.add_argument("--spec-batch", type=int, help="The number of sequences per batch in speculative modes "
                                                   "(default: --batch).")
    ap.add_argument("--requests", type=int, help="Requests per mode (default: one batch); more than a batch "
                                                 "keeps the batch full as rows finish (see --no-refill).")
    ap.add_argument("--no-refill", action="store_true", help="Run requests beyond the batch in waves, each "
                                                             "wave waiting for its slowest sequence.")
    ap.add_argument("--refill-prefill", choices=("pass", "own"), default="pass",
                    help="Joining rows' prefill rides the batch's next target pass (default), or runs as a "
                         "pass of its own.")
    ap.add_argument("--refill-rows", default="0", help="A comma list: each speculative mode runs with joins waiting "
                                                        "for each count of free rows (RunConfig.refill_rows; 0, the "
                                                        "default: placement/refill.py's choice), e.g. 16,32. "
                                                        "Baselines take the list's first.")
    ap.add_argument("--prompt-len", type=int, help="Tokens per random prompt (default: the workload's).")
    ap.add_argument("--gen", type=int, help="Tokens generated per sequence (default: the workload's).")
    ap.add_argument("--gpu-memory", default="24GiB", help="Cap the executor's GPU memory (default 24GiB).")
    ap.add_argument("--agreement", type=float, default=0.8,
                    help="How often the constructed draft's token is the target's (default 0.8).")
    ap.add_argument("--k", type=int, default=4, help="The draft length of modes without @k (default 4).")
    ap.add_argument("--modes", default="none,single", help="A comma list of none/single/dual, each with an "
                                                           "optional +recompute (the paper's: the draft's KV "
                                                           "rebuilt per round from each sequence's whole context), "
                                                           "an optional @k or @auto (e.g. single@6, single@auto) "
                                                           "and an optional /mN: N micro-batches per pass for "
                                                           "that mode only (e.g. single@auto/m2).")
    ap.add_argument("--prefill-batch", type=int, default=32,
                    help="The number of sequences prefilled at a time (default 32).")
    ap.add_argument("--slots", type=int, default=2,
                    help="The number of device buffers the streamed target layers rotate through (default 2).")
    ap.add_argument("--attention-threads", type=int, default=max((os.cpu_count() or 2) - 2, 1),
                    help="Threads of the CPU attention worker (default: this machine's cores less two; every "
                         "core made W4's passes 1.8x slower on the H200 host, the executor starved: "
                         "docs/benchmarks.md, session 27).")
    ap.add_argument("--no-draft", action="store_true", help="Start the actors without a draft (mode none only).")
    ap.add_argument("--draft-window", type=int, help="Make the draft attend over only the last W tokens (a KV "
                                                     "ring).")
    ap.add_argument("--draft-kv-fp8", action="store_true", help="Store the windowed draft's KV cache in fp8.")
    ap.add_argument("--draft-fp8", action="store_true", help="Keep the draft's layer matrices in fp8 (half its "
                                                             "GPU memory; see --resident).")
    ap.add_argument("--target-fp8", action="store_true", help="Quantize the target to fp8 per output channel as "
                                                              "the loader writes host memory (--quantize fp8): "
                                                              "half the bytes per pass.")
    ap.add_argument("--resident", default="0", help="Target layers kept on the GPU by the actors every mode "
                                                    "runs on (the memory an fp8 draft frees); 'auto': as many as "
                                                    "the planner's GPU account fits beside this run's slots, draft "
                                                    "and draft KV.")
    ap.add_argument("--draft-sinks", type=int, default=0, help="The windowed draft also keeps each sequence's "
                                                               "first N tokens in view.")
    ap.add_argument("--no-draft-graphs", action="store_true", help="Launch the draft's steps one kernel at a "
                                                                    "time instead of replaying CUDA graphs.")
    ap.add_argument("--micro-batches", default="1", help="A comma list: each mode runs with each count of "
                                                           "micro-batches per target pass (e.g. 1,2).")
    ap.add_argument("--doorbell", default="1", help="A comma list of 0/1: each mode runs with a pass's layer "
                                                     "hand-offs through Ray's submitter (0) and/or the mailboxes' "
                                                     "doorbells (1, plan.layer_doorbell), e.g. 0,1.")
    ap.add_argument("--join-overlap", default="0", help="A comma list of 0/1: each mode runs with rows joining a "
                                                         "pass prefilling in line with its parts (0, the default) "
                                                         "and/or beside them on a stream of their own (1, "
                                                         "plan.join_overlap), e.g. 0,1. Baselines take the list's "
                                                         "first.")
    ap.add_argument("--draft-feed-last", default="1", help="A comma list of 0/1: each speculative mode runs with "
                                                            "the draft feeding itself its last proposal each round "
                                                            "(1, the default, plan.draft_feed_last: the next round's "
                                                            "first step is a graphed one-token step) and/or not (0), "
                                                            "e.g. 1,0.")
    ap.add_argument("--mapped-out", default="1", help="A comma list of 0/1: each mode, the baseline too, runs "
                                                       "with the GPU reading each attention output from the "
                                                       "mailbox by a kernel (1, plan.mapped_out, the default) "
                                                       "and/or by a DMA queued with the weight copy (0), e.g. 1,0.")
    ap.add_argument("--early-posts", default="0", help="A comma list of 0/1: each mode, the baseline too, runs "
                                                        "with the executor finishing later parts' layers while "
                                                        "the next layer's weights copy (1, plan.early_posts) "
                                                        "and/or in call order (0, the default), e.g. 1,0.")
    ap.add_argument("--fused-prefill", default=None, help="A comma list of 0/1: each mode, the baseline too, runs "
                                                           "with the target's prefill layers' elementwise work fused "
                                                           "by torch.compile (1, plan.fused_prefill, the same values) "
                                                           "and/or eager (0), e.g. 1,0. Default: the plan's, 1 on "
                                                           "CUDA and 0 on a CPU.")
    ap.add_argument("--kv-huge-pages", default="0", help="A comma list of 0/1: each mode, the baseline too, runs "
                                                          "with the CPU worker's host KV cache asked for in 2 MiB "
                                                          "pages (1, plan.kv_huge_pages) and/or as torch allocates "
                                                          "it (0, the default), e.g. 1,0.")
    ap.add_argument("--draft-prime-beside", default="1", help="A comma list of 0/1: each speculative mode runs "
                                                               "with rows joining a batch having the draft read "
                                                               "their prompts on a thread and stream of their own "
                                                               "(1, the default, plan.draft_prime_beside) and/or "
                                                               "before the batch's next round (0), e.g. 1,0.")
    ap.add_argument("--copy-chunk-mib", default="64", help="A comma list: each mode runs with the weight copy "
                                                            "issued in pieces of each size (plan.copy_chunk_mib; a small "
                                                            "copy such as an attention output waits behind the pieces "
                                                            "queued ahead of it), e.g. 64,16.")
    ap.add_argument("--shm-prefill", action=argparse.BooleanOptionalAction, default=True,
                    help="Hand the prefill's K/V to the CPU worker through a shared-memory ring (the default) "
                         "or, with --no-shm-prefill, through Ray's object store (plan.shm_prefill).")
    ap.add_argument("--worker-layer-runs", action=argparse.BooleanOptionalAction, default=True,
                    help="The CPU worker attends a pass's layers between its first and last in one call (the "
                         "default) or, with --no-worker-layer-runs, in a call per layer (plan.worker_layer_runs).")
    ap.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                    help="The CPU worker's process keeps the memory it frees (the default) or, with "
                         "--no-keep-freed-memory, glibc hands it back and each layer faults its temporaries in "
                         "again (plan.keep_freed_memory; for the worker's life, so compare in two bench runs).")
    ap.add_argument("--host-embedding", action="store_true",
                    help="Leave the target's embedding table in host memory rather than on the GPU "
                         "(plan.host_embedding): its GPU memory goes to KV rows ('auto' counts it), the baseline's "
                         "actors too.")
    ap.add_argument("--ragged-attention", type=int, metavar="KEYS", help="CPU attention over rows of "
                                                                          "different lengths in ranges of similar "
                                                                          "ones, a call costing KEYS keys, e.g. 512 "
                                                                          "(plan.ragged_attention; default off).")
    ap.add_argument("--cpu-query-rows", type=int, metavar="ROWS",
                    help="The CPU worker's attention calls take at most ROWS query rows per K/V head "
                         "(plan.cpu_query_rows; 0: no limit; default: models/attention.CPU_QUERY_ROWS, 63).")
    ap.add_argument("--repeat", type=int, default=1,
                    help="Run every mode's runs this many times in turn on the same actors, the later ones "
                         "named #2, #3...: whether a run first in its process differs from later ones "
                         "(the baseline runs once).")
    ap.add_argument("--no-warmup", action="store_true", help="Skip the short untimed run of each schedule "
                                                              "before the timed modes.")
    ap.add_argument("--gpu-kv-rows", default="0",
                    help="A comma list: each mode runs with the first N rows of each batch keeping their target "
                         "KV on the GPU and attending there (plan.gpu_kv_rows); 'auto': as many as the planner's "
                         "GPU account fits beside this run's placement and --resident layers (0 without a GPU).")
    ap.add_argument("--baseline-resident", help="Also run `none` on actors of its own that keep N target "
                                                "layers on the GPU (the memory no draft uses; 'auto': as many "
                                                "as the planner places), and print ratios against it too.")
    ap.add_argument("--baseline-gpu-kv-rows", default="0",
                    help="With --baseline-resident: a comma list; the baseline runs with each count of its rows "
                         "keeping their KV on the GPU and attending there (plan.gpu_kv_rows; 'auto': as many as fit "
                         "beside its resident layers by the planner's account), the fastest being the one ratios "
                         "use, so that plain decoding gets the same lever as the speculative modes' --gpu-kv-rows, "
                         "e.g. 0,auto. Default 0.")
    ap.add_argument("--baseline-copy-chunk-mib",
                    help="With --baseline-resident: a comma list of copy piece sizes the baseline runs with, "
                         "each (plan.copy_chunk_mib), the fastest being the one ratios use, so that plain "
                         "decoding gets the choice the modes' --copy-chunk-mib list gives them. Default: the "
                         "first of --copy-chunk-mib.")
    ap.add_argument("--baseline-switches", choices=("all", "first"), default="all",
                    help="With --baseline-resident: whether the baseline runs at every value of the "
                         "--mapped-out, --early-posts, --fused-prefill and --kv-huge-pages lists, as the modes "
                         "do (all, the default), or only "
                         "at each list's first (first: one plain run where the modes compare both ways).")
    ap.add_argument("--accelerate", metavar="N[:T[:RESERVE]]", type=_accelerate_arg,
                    help="After the modes, time what users run instead: transformers + accelerate offload "
                         "(device_map=auto under --gpu-memory, RESERVE of it left for activations, default "
                         "6GiB) of the same target shape on the first N of the requests the modes ran, T new "
                         "tokens each (default 3), in a process of its own once the actors' memory is free, "
                         "and print every mode's ratio to it (Mixtral-shaped workloads; needs accelerate).")
    ap.add_argument("--stall-s", type=float, default=600.0,
                    help="A pass or prefill that gives no result for this many seconds (or 30 of the run's "
                         "passes, if longer) ends the mode with PassStalled instead of waiting for ever "
                         "(plan.stall_s; 0: no limit). Default 600.")
    ap.add_argument("--trace-dir", help="Write a Chrome-trace JSON timeline per mode into this folder.")
    ap.add_argument("--json", help="Write the results here as JSON.")
    ap.add_argument("--ray-address", help="The Ray cluster to join, or 'local' (default: as `specoffload "
                                          "generate`).")
    ap.add_argument("--no-dashboard", dest="dashboard", action="store_false", default=None,
                    help="Start a local Ray cluster without its dashboard.")
    return ap


def run_delta(before: dict, after: dict) -> dict:
    """The coordinator's stats over one run: a counter (a number in both samples) as its growth,
    anything else as the run left it. A field that had no number before the run (the CPU worker's
    huge pages are None until it makes a cache of 1 GiB or more) is a snapshot, not a counter:
    subtracting it failed W4's run on the GPU machine (session 43) after it had finished."""
    def number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    return {k: v - before[k] if number(v) and number(before.get(k)) else v for k, v in after.items()}


def _baseline_resident(a, tspec, cuda: bool) -> int:
    """--baseline-resident: a count, or 'auto' (what the planner keeps resident without a draft)."""
    if a.baseline_resident != "auto":
        n = int(a.baseline_resident)
        if not 1 <= n < tspec.num_layers:
            raise ValueError(f"needs 1..{tspec.num_layers - 1} layers or 'auto', got {n}")
        return n
    from specoffload.placement.hardware import measure
    from specoffload.placement.planner import Workload, plan

    hw = measure("cuda" if cuda else "cpu", a.gpu_memory if cuda else None)
    n = plan(tspec, None, hw, Workload(a.prompt_len, a.gen, a.requests or a.batch, a.agreement)).best.resident
    if not 1 <= n < tspec.num_layers:
        raise ValueError(f"the planner keeps {n} layers resident on this machine: give a count")
    return n


def _baseline_gpu_kv_rows(a, tspec, resident: int, cuda: bool) -> list[int]:
    """--baseline-gpu-kv-rows: counts and 'auto' (placement.planner.gpu_kv_rows_fit for plain
    decoding with `resident` layers and two slots; 0 off CUDA), each run in turn."""
    rows = _row_counts(a.baseline_gpu_kv_rows, lambda: _baseline_gpu_kv_rows_auto(a, tspec, resident) if cuda else 0)
    return list(dict.fromkeys(rows))  # 'auto' may come to a count also listed: run it once


def _baseline_gpu_kv_rows_auto(a, tspec, resident: int) -> int:
    from dataclasses import replace

    from specoffload.placement.plan import parse_bytes
    from specoffload.placement.planner import Workload, gpu_kv_rows_fit

    c = replace(_candidate(a, None, a.batch), resident=resident, slots=2)
    return gpu_kv_rows_fit(tspec, None, c, Workload(a.prompt_len, a.gen, a.requests or a.batch, a.agreement),
                           parse_bytes(a.gpu_memory))


def _accelerate_arg(text: str):
    from specoffload import bench_accelerate

    try:
        return bench_accelerate.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _batch_arg(text: str):
    if text == "max":
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"needs a count >= 1 or 'max', got {text!r}")
    return n


def _candidate(a, draft, batch: int):
    """The planner's candidate for this run's own placement (its schedule's kind, draft KV,
    slots, prefill sub-batch) at `batch` sequences."""
    from specoffload.placement.draft_kv import DraftKV
    from specoffload.placement.planner import Candidate

    kv = DraftKV("gpu", a.draft_window, a.draft_sinks if a.draft_window else 0, a.draft_kv_fp8)
    return Candidate("none" if draft is None else "single", batch, k=a.k, kv=kv, draft_fp8=a.draft_fp8,
                     slots=a.slots, prefill_batch=a.prefill_batch, host_embedding=a.host_embedding)


def _largest_batch(a, tspec, dspec, cuda: bool) -> int:
    """--batch max, by the planner's memory account on this machine (placement.planner.largest_batch)."""
    from specoffload.errors import CapacityError, ConfigError
    from specoffload.placement.hardware import measure
    from specoffload.placement.planner import Workload, largest_batch

    draft = None if a.no_draft else dspec
    try:
        hw = measure("cuda" if cuda else "cpu", a.gpu_memory if cuda else None, quick=True)
        b, why = largest_batch(tspec, draft, _candidate(a, draft, 1),
                               Workload(a.prompt_len, a.gen, a.requests or 1, a.agreement), hw)
    except (CapacityError, ConfigError) as e:
        raise BenchError(f"--batch max: {e}") from None
    print(f"--batch max: {b} sequences of {a.prompt_len} + {a.gen} tokens "
          f"({'one more: ' + why if why else 'the most it tries'})", flush=True)
    return b


def _resident(a, tspec, dspec, cuda: bool) -> int:
    """--resident: a count, or 'auto': what the GPU memory cap (--gpu-memory) holds beside this
    run's own placement; 0 without a GPU, where host and "device" are one memory."""
    if a.resident != "auto":
        try:
            return int(a.resident)
        except ValueError:
            raise BenchError(f"--resident needs a count or 'auto', got {a.resident!r}") from None
    if not cuda:
        return 0
    from specoffload.errors import CapacityError, ConfigError
    from specoffload.placement.plan import parse_bytes
    from specoffload.placement.planner import Workload, spare_layers

    draft = None if a.no_draft else dspec
    c = _candidate(a, draft, max(a.batch, a.spec_batch or 0))
    try:
        return spare_layers(tspec, draft, c, Workload(a.prompt_len, a.gen, a.requests or a.batch, a.agreement),
                            parse_bytes(a.gpu_memory))
    except (CapacityError, ConfigError) as e:
        raise BenchError(f"--resident auto: {e}") from None


def _row_counts(text: str, auto) -> list[int]:
    """A comma list of GPU row counts >= 0 and 'auto' (`auto()` gives its count), or ValueError."""
    out = []
    for v in str(text).split(","):
        v = v.strip()
        if v == "auto":
            out.append(auto())
            continue
        try:
            n = int(v)
        except ValueError:
            raise ValueError(f"needs counts or 'auto', got {v!r}") from None
        if n < 0:
            raise ValueError(f"needs counts >= 0, got {n}")
        out.append(n)
    return out


def _gpu_kv_rows(a, tspec, dspec, cuda: bool) -> list[int]:
    """--gpu-kv-rows: counts, or 'auto' (placement.planner.gpu_kv_rows_fit)."""
    try:
        return _row_counts(a.gpu_kv_rows, lambda: _gpu_kv_rows_auto(a, tspec, dspec) if cuda else 0)
    except ValueError as e:
        raise BenchError(f"--gpu-kv-rows {e}") from None


def _gpu_kv_rows_auto(a, tspec, dspec) -> int:
    from dataclasses import replace

    from specoffload.errors import CapacityError, ConfigError
    from specoffload.placement.plan import parse_bytes
    from specoffload.placement.planner import Workload, gpu_kv_rows_fit

    draft = None if a.no_draft else dspec
    c = replace(_candidate(a, draft, max(a.batch, a.spec_batch or 0)), resident=a.resident)
    try:
        return gpu_kv_rows_fit(tspec, draft, c, Workload(a.prompt_len, a.gen, a.requests or a.batch, a.agreement),
                               parse_bytes(a.gpu_memory))
    except (CapacityError, ConfigError) as e:
        raise BenchError(f"--gpu-kv-rows auto: {e}") from None


def _options(argv) -> argparse.Namespace:
    a = build_parser().parse_args(argv)
    for name, v in zip(("target_layers", "draft_layers", "batch", "prompt_len", "gen"), WORKLOADS[a.workload]):
        if getattr(a, name) is None:
            setattr(a, name, v)
    return a


def _plan(a, lists: SettingLists, cuda: bool):
    from specoffload.errors import ConfigError
    from specoffload.placement.plan import Plan

    first = lists.first()
    try:
        plan = Plan(device="cuda" if cuda else "cpu", gpu_memory=a.gpu_memory if cuda else None, num_slots=a.slots,
                    batch_size=a.batch, prefill_batch=a.prefill_batch, attention_threads=a.attention_threads,
                    attention_cpus=1, draft_window=a.draft_window, draft_kv_fp8=a.draft_kv_fp8,
                    draft_sinks=a.draft_sinks, draft_graphs=not a.no_draft_graphs, trace=bool(a.trace_dir),
                    draft_fp8=a.draft_fp8, gpu_layers=_resident_layers(a.target_layers, a.resident),
                    shm_prefill=a.shm_prefill, worker_layer_runs=a.worker_layer_runs,
                    keep_freed_memory=a.keep_freed_memory, host_embedding=a.host_embedding,
                    ragged_attention=a.ragged_attention, cpu_query_rows=a.cpu_query_rows,
                    layer_doorbell=first.doorbell, join_overlap=first.join_overlap,
                    draft_feed_last=first.draft_feed_last, draft_prime_beside=first.draft_prime_beside,
                    mapped_out=first.mapped_out, early_posts=first.early_posts, fused_prefill=first.fused_prefill,
                    kv_huge_pages=first.kv_huge_pages,
                    copy_chunk_mib=first.copy_chunk_mib, gpu_kv_rows=first.gpu_kv_rows, stall_s=a.stall_s)
        plan.check_layers(a.target_layers)
    except ConfigError as e:
        raise BenchError(e) from None
    return plan


def _resident_layers(num_layers: int, n: int) -> tuple:
    """placement.resident_layers' spread; more layers than the model has stay a range, for
    Plan.check_layers to refuse in its own words."""
    from specoffload.placement.resident_layers import resident_layers

    return resident_layers(num_layers, n) if 0 <= n <= num_layers else tuple(range(n))


def _gpu_joins(row: dict) -> str:
    """' (N rows into GPU rows)' where joining rows took freed GPU rows (plan.gpu_kv_rows)."""
    n = row.get("gpu_rows_joined") or 0
    return f" ({n} rows into GPU rows)" if n else ""


class Bench:
    """The modes of one invocation, run one after another on the same actors."""

    def __init__(self, a, plan, tspec, tsrc, lists: SettingLists):
        self.repetition = 1  # which of --repeat's rounds of the runs is running (its name says past the first)
        self.a, self.plan, self.tspec, self.tsrc, self.lists = a, plan, tspec, tsrc, lists
        self.coord, self.run_id = None, None
        self.many_micro = False
        self.results: list[dict] = []
        self.prompts: list[list[int]] = []  # the first timed mode's (--accelerate runs them)
        self.gen = torch.Generator().manual_seed(0)
        self.layer_bytes = tspec.layer_bytes()
        shape = job_shape(a)
        if shape is not None:  # the same requests, seeded, for every mode
            from specoffload.bench_job import job_payload

            # The constructed target's greedy chain (under --target-fp8, of the bf16 weights it quantizes)
            chain = getattr(tsrc, "inner", tsrc).next_tokens()
            self.job = job_payload(shape, chain.numpy(), tspec.eos_token_ids[0], tspec.vocab_size)
        else:
            self.job = None

    def start(self, run_plan, draft_src, what: str):
        """Coordinator and actors for `run_plan`; one that refuses to start (say the plan does
        not fit the GPU) leaves nothing behind in /dev/shm and raises its own one-line error."""
        from specoffload.actors.coordinator import Coordinator, wait_ready
        from specoffload.actors.guard import guarded
        from specoffload.configs.run_config import RunConfig

        t0, run_id = time.perf_counter(), uuid.uuid4().hex[:8]
        c = ray.remote(guarded(Coordinator, "coordinator", run_id)).options(num_cpus=0, max_concurrency=2).remote(
            ("object", self.tsrc), self.tspec, run_plan, draft_src, RunConfig(schedule="none", batch_size=self.a.batch),
            run_id, True)
        info = wait_ready(c, run_id)
        self.coord, self.run_id = c, run_id
        print(f"{what} up in {time.perf_counter() - t0:.1f} s: {info}", flush=True)

    def stop(self, timeout=None):
        if self.coord is not None:
            ray.get(self.coord.shutdown.remote(), timeout=timeout)
            self.coord = None

    def abandon(self):
        """Kill an actor set that cannot run on (one died, or a pass stalled) and remove its
        /dev/shm folder, so that the baseline's actors start on a clean machine."""
        from specoffload.actors.supervisor import teardown

        if self.coord is not None:
            teardown(self.run_id)
            try:
                ray.kill(self.coord)
            except Exception:  # noqa: BLE001 - already dead
                pass
            self.coord = None

    def run_or_record(self, failed: list, label: str, mode_spec: tuple, s: RunSettings) -> bool:
        """`run_mode`, with its failure put in `failed` as one line instead of raised: one mode's
        failure must not cost the others their device time. False when its actors cannot run
        another mode (one died, or a pass stalled): they are killed."""
        try:
            self.run_mode(label, mode_spec, s)
            return True
        except Exception as e:  # noqa: BLE001 - any failure: the table still shows the modes that ran
            why, reusable = _mode_failure(e)
            failed.append(f"{self.mode_name(label, mode_spec, s)} failed: {why}")
            print(f"  {failed[-1]}" + ("" if reusable else "; the modes left on these actors are skipped"), flush=True)
            if not reusable:
                self.abandon()
            return reusable

    def mode_name(self, label: str, mode_spec: tuple, s: RunSettings) -> str:
        """A mode's row name in the table: its label and the settings the lists vary."""
        name = label
        if self.many_micro and mode_spec[4] is None:
            name = f"{label}/m{s.micro_batches}"
        name += self.lists.suffix(s, baseline=label.startswith("none+"))  # baselines keep the plan's
        return name + (f"#{self.repetition}" if self.repetition > 1 else "")

    def payload(self, gen: torch.Generator, n: int, max_tokens: int) -> list[dict]:
        """n requests of random prompt tokens, generating max_tokens each."""
        return [{"rid": i, "prompt_ids": torch.randint(3, self.tspec.vocab_size, (self.a.prompt_len,),
                                                       generator=gen).tolist(),
                 "params": {"max_tokens": max_tokens, "ignore_eos": True}, "eos": [2]} for i in range(n)]

    def configure(self, run_cfg, draft_kv: str):
        ray.get(self.coord.set_run_config.remote(run_cfg))
        # +recompute is the paper's schedule: the draft re-reads each sequence's whole context.
        kv = replace(self.plan.draft_kv_policy, placement=draft_kv)
        ray.get(self.coord.set_draft_kv.remote(kv.full_context() if kv.rebuilt else kv))

    def warm_up(self, modes: dict):
        """A short untimed run of each schedule: the first generation on fresh actors pays
        one-off costs (CUDA start-up, allocator growth, first graph captures), which would
        otherwise be charged to the mode listed first."""
        from specoffload.configs.run_config import RunConfig

        t = time.perf_counter()
        wg = torch.Generator().manual_seed(1)
        for mode, k, draft_kv in dict.fromkeys((v[0], v[1], v[3]) for v in modes.values()):
            self.configure(RunConfig(schedule=mode, k=k, k_max=max(k, 8), batch_size=1, refill=not self.a.no_refill),
                           draft_kv)
            ray.get(self.coord.generate.remote(self.payload(wg, 2 if mode == "dual" else 1, min(self.a.gen, 4))))
        print(f"warm-up in {time.perf_counter() - t:.1f} s", flush=True)

    def run_mode(self, label: str, mode_spec: tuple, s: RunSettings):
        """One timed mode at one run's settings (s.resident: the target layers the actors keep
        on the GPU, not streamed; s.gpu_kv_rows: each batch's first rows with their KV there)."""
        from specoffload.configs.run_config import RunConfig

        a, coord = self.a, self.coord
        mode, k, adaptive, draft_kv, _ = mode_spec
        n = a.batch if mode == "none" else (a.spec_batch or a.batch)
        # The dual schedule splits the same sequences into two batches: host memory holds the
        # target KV of n sequences in every mode.
        bs = max(n // 2, 1) if mode == "dual" else n
        n = len(self.job) if self.job else a.requests or n
        work = self.job or self.payload(self.gen, n, a.gen)
        self.prompts = self.prompts or [r["prompt_ids"] for r in work]
        # Refill unless --no-refill, unlike LLM: --requests beyond a batch measures a stream
        # that keeps the batch full.
        cfg = RunConfig(schedule=mode, k=k, k_max=16 if adaptive else max(k, 8), adaptive_k=adaptive, batch_size=bs,
                        refill=not a.no_refill, refill_prefill=a.refill_prefill,
                        refill_rows=min(s.refill_rows, bs))  # 0: placement/refill.py's
        self.configure(cfg, draft_kv)
        ray.get(coord.set_micro_batches.remote(s.micro_batches))
        ray.get(coord.set_gpu_kv_rows.remote(s.gpu_kv_rows))
        # what the actors took (a doorbell needs mailboxes, join overlap a plan that allows it)
        bell, join, feed, prime, mapped, early, fused, huge = ray.get([coord.set_switch.remote(name, on) for name, on in (
            ("layer_doorbell", s.doorbell), ("join_overlap", s.join_overlap), ("draft_feed_last", s.draft_feed_last),
            ("draft_prime_beside", s.draft_prime_beside), ("mapped_out", s.mapped_out), ("early_posts", s.early_posts),
            ("fused_prefill", s.fused_prefill), ("kv_huge_pages", s.kv_huge_pages))])
        ray.get(coord.set_copy_chunk.remote(s.copy_chunk_mib))
        if a.trace_dir:
            ray.get(coord.trace.remote())  # drop spans of earlier modes
        before = ray.get(coord.stats.remote())
        host_before = host_facts.sample()  # what the host's CPUs did during the run (one node)
        vm_before, avail = memory_facts.vm_counters(), host_facts.mem_available_gib()
        t = time.perf_counter()
        ref, done = coord.generate.remote(work), 0
        while not ray.wait([ref], timeout=30)[0]:  # a progress line every 30 s: a cut-short run still says something
            fin, prog = ray.get(coord.poll.remote())
            done += len(fin)
            print(f"  {label}: {time.perf_counter() - t:.0f} s, {done}/{n} requests done, "
                  f"{prog.get('passes', 0)} passes, {prog.get('tokens', 0)} tokens", flush=True)
        st = ray.get(ref)
        wall = time.perf_counter() - t
        # the run's own figure first: what follows reads more stats, and a failure there must
        # not leave a finished run without its number
        print(f"  {label}: finished in {wall:.2f} s, {st['tokens']} tokens, {st['tokens'] / wall:.1f} tok/s, "
              f"{st['passes']} passes", flush=True)
        host = host_facts.between(host_before, host_facts.sample(), min_share=0.5)
        vm = memory_facts.vm_between(vm_before, memory_facts.vm_counters())
        ray.get(coord.poll.remote())
        row = self._row(label, st, before, wall, bs * (2 if mode == "dual" else 1), n, s.resident)
        row["host_busy"], row["host_busy_processes"] = host["busy"], host["busy_processes"]
        row["host_mem_available_gib"], row["host_vm"] = avail, vm
        row["micro_batches"], row["doorbell"], row["copy_chunk_mib"] = s.micro_batches, bell, s.copy_chunk_mib
        row["gpu_kv_rows"], row["join_overlap"], row["draft_feed_last"] = s.gpu_kv_rows, join, feed
        row["refill_rows"], row["draft_prime_beside"], row["mapped_out"] = cfg.refill_rows, prime, mapped
        row["early_posts"], row["fused_prefill"], row["kv_huge_pages"] = early, fused, huge
        row["mode"] = self.mode_name(label, mode_spec, s)
        self.results.append(row)
        print(json.dumps(row), flush=True)
        if a.trace_dir:
            os.makedirs(a.trace_dir, exist_ok=True)
            # plain file names (a device call returns none with odd characters)
            name = row["mode"].replace("/", "_").replace("@", "_k").replace("+", "_").replace("#", "_run")
            with open(os.path.join(a.trace_dir, f"trace_{name}.json"), "w") as f:
                json.dump(ray.get(coord.trace.remote()), f)

    def _row(self, label, st: dict, before: dict, wall: float, batch: int, n: int, on_gpu: int) -> dict:
        """A mode's figures; decode figures count the time after prefill (one prefill pass per batch)."""
        d = run_delta(before, st)
        passes = st["passes"]
        copy_s = d.get("weight_copy_s", 0.0)
        decode_s = st["seconds"] - st["prefill_seconds"]
        streamed = self.layer_bytes * (self.a.target_layers - on_gpu) * passes
        mem = ray.get(self.coord.memory.remote())
        return {
            "mode": label, "batch": batch, "requests": n,
            "batches": st.get("batches"), "wall_s": round(wall, 2), "tokens": st["tokens"],
            "tokens_per_s": round(st["tokens"] / wall, 1), "decode_tokens_per_s": st["decode_tokens_per_s"],
            "prefill_s": round(st["prefill_seconds"], 2), "passes": passes,
            "s_per_pass": round(decode_s / max(passes, 1), 3),
            # weights streamed per second of decoding, and the copy engine's rate while busy
            "stream_GBps": round(streamed / decode_s / 1e9, 1) if decode_s > 0 else None,
            "copy_GBps": round(d.get("weight_bytes", 0) / max(copy_s, 1e-9) / 1e9, 1) if copy_s else None,
            "acceptance": st.get("acceptance"), "tokens_per_seq_pass": st.get("tokens_per_seq_pass"),
            "k_mean": st.get("k_mean"), "k_counts": st.get("k_counts"),
            # per verification pass: (k, seconds, whether adaptive k took it as k's cost)
            "pass_log": st.get("pass_log"),
            # the job's clock: generate returns when its last request finishes
            "time_to_last_s": round(wall, 2), "rows_busy": st.get("rows_busy"),
            "passes_rows_busy_90": st.get("passes_rows_busy_90"), "joins": st.get("joins"),
            "join_retreats": st.get("join_retreats"),
            "rows_busy_while_waiting": st.get("rows_busy_while_waiting"),
            "passes_rows_busy_90_while_waiting": st.get("passes_rows_busy_90_while_waiting"),
            "gpu_busy": round((d.get("target_s", 0) + d.get("draft_s", 0)) / wall, 3),
            "gpu_busy_decode": round((d.get("target_s", 0) + d.get("draft_s", 0)) / max(decode_s, 1e-9), 3),
            "cpu_attention_s": round(d.get("cpu_attention_s", 0), 2), "target_gpu_s": round(d.get("target_s", 0), 2),
            "draft_gpu_s": round(d.get("draft_s", 0), 2), "copy_s": round(copy_s, 2),
            "draft_graph_steps": d.get("draft_graph_steps", 0),
            # (token, layer) pairs attended on the GPU (plan.gpu_kv_rows) and on the CPU worker
            "gpu_row_tokens": d.get("gpu_row_tokens", 0), "cpu_row_tokens": d.get("cpu_row_tokens", 0),
            # rows that joined a running batch into GPU rows its finished sequences freed
            "gpu_rows_joined": d.get("gpu_rows_joined", 0),
            "joins_beside": d.get("joins_beside", 0),  # joins prefilled beside a pass's parts (plan.join_overlap)
            # time the executor and the CPU worker waited on doorbells (plan.layer_doorbell)
            "executor_bell_wait_s": round(d.get("executor_bell_wait_s", 0), 2),
            "worker_bell_wait_s": round(d.get("worker_bell_wait_s", 0), 2),
            # the CPU worker's time making batches' host KV caches (rows joining: one each) and
            # merging joined rows in, and the caches made in a freed one's storage
            "worker_start_s": round(d.get("worker_start_s", 0), 2), "worker_merge_s": round(d.get("worker_merge_s", 0), 2),
            "worker_spare_reused": d.get("worker_spare_reused", 0),
            # the CPU worker's page faults this run, and its memory in huge pages once the run's
            # host KV cache was made (memory_facts: a first run in a process was slower on W4)
            "worker_minor_faults": d.get("worker_minor_faults"),
            "worker_keeps_freed_memory": d.get("worker_keeps_freed_memory"),  # plan.keep_freed_memory, as applied
            "worker_anon_huge_gib": None if st.get("worker_anon_huge_at_start") is None else round(
                st["worker_anon_huge_at_start"] / 2**30, 2),
            # between passes: the generator's own time from a result to its next call, and the
            # driver's time issuing passes' calls (the rest of the gap is drafting and Ray)
            "driver_s": st.get("driver_s"), "pass_submit_s": round(d.get("pass_submit_s", 0), 4),
            # the executor's peak device memory so far (the cap bounds it)
            "gpu_peak_gib": round(mem.get("max_allocated", 0) / 2**30, 2),
            # the allocator's retries at the cap so far (GpuBudget.report); cumulative over modes
            "gpu_alloc_retries": mem.get("alloc_retries", 0),
        }

    def baseline(self, resident: int, gpu_rows: list[int] = (0,)) -> str | None:
        """The fair non-speculative baseline: `none` on actors of its own (an executor's
        resident layers are fixed when it starts) that keep `resident` target layers in the
        GPU memory a draft would use, with two slots as the planner counts, at each of the
        micro-batch counts, copy piece sizes and counts of rows attending on the GPU (the
        fastest is the one ratios use). Returns why it did not start or did not finish, if so (the modes
        already run still get their table)."""
        from specoffload.configs.run_config import RunConfig
        from specoffload.errors import SpecOffloadError

        try:
            base = replace(self.plan, gpu_layers=_resident_layers(self.tspec.num_layers, resident), num_slots=2,
                           gpu_kv_rows=gpu_rows[0])
            self.start(base, None, "baseline actors")
        except SpecOffloadError as e:
            return f"the baseline keeping {resident} layers did not start: {e}"
        if not self.a.no_warmup:
            self.configure(RunConfig(schedule="none", batch_size=1, refill=not self.a.no_refill), "gpu")
            ray.get(self.coord.generate.remote(self.payload(torch.Generator().manual_seed(1), 1, min(self.a.gen, 4))))
        run = ("none", self.a.k, False, "gpu", None)  # k unused without a draft
        failed = []
        for s in self.lists.baseline_runs(resident, gpu_rows):
            label = f"none+r{resident}" + (f"g{s.gpu_kv_rows}" if s.gpu_kv_rows else "")
            if not self.run_or_record(failed, label, run, s):
                break
        self.stop()
        return "; ".join(failed) or None


def print_table(a, tspec, results: list[dict], layer_bytes: int, resident: int | None):
    base = next((r for r in results if r["mode"].split("/")[0] == "none"), None)
    print(f"\n{a.workload.split('-')[0].upper()} (target {tspec.model_type} {a.target_layers} layers"
          f"{' fp8' if tspec.weights == 'fp8' else ''}, "
          f"{layer_bytes / 1e9:.2f} GB/layer, {a.resident} resident, {','.join(map(str, a.gpu_kv_rows))} GPU KV rows, draft "
          f"{a.draft_layers} layers{' fp8' if a.draft_fp8 else ''}, cap {a.gpu_memory}, prompt {a.prompt_len}, "
          f"gen {a.gen}, agreement {a.agreement})")
    print(f"{'mode':16} {'batch':>5} {'tok/s':>7} {'x none':>6} {'decode tok/s':>12} {'x none':>6} {'s/pass':>7} "
          f"{'GB/s':>6} {'copyGB/s':>8} {'accept':>7} {'tok/seq/pass':>12} {'gpu busy':>8}")
    for r in results:
        x = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        xd = r["decode_tokens_per_s"] / base["decode_tokens_per_s"] if base else float("nan")
        print(f"{r['mode']:16} {r['batch']:5d} {r['tokens_per_s']:7.1f} {x:6.2f} {r['decode_tokens_per_s']:12.1f} {xd:6.2f} "
              f"{r['s_per_pass']:7.3f} {str(r['stream_GBps']):>6} {str(r['copy_GBps']):>8} {str(r['acceptance']):>7} "
              f"{str(r['tokens_per_seq_pass']):>12} {r['gpu_busy_decode']:8.3f}")
    if any(r.get("rows_busy") is not None for r in results):
        print("rows busy (mean over passes; share of passes >= 90%; mean and share >= 90% while requests waited), "
              "joins, time to the last request: " +
              ", ".join(f"{r['mode']} {r['rows_busy']} ({r['passes_rows_busy_90']}; {r['rows_busy_while_waiting']}, "
                        f"{r.get('passes_rows_busy_90_while_waiting')}), "
                        f"{r['joins']} joins{_gpu_joins(r)}, {r['time_to_last_s']} s" for r in results))
    per_layer = [r for r in results if r.get("passes")]
    if per_layer:
        # Which side bounds a layer: the worker's attention and what each side waited for the
        # other (doorbell waits; 0 with Ray's hand-offs), over passes x layers.
        keys = ("cpu_attention_s", "worker_bell_wait_s", "executor_bell_wait_s", "target_gpu_s")
        ms = lambda r, key: (r.get(key) or 0.0) / (r["passes"] * a.target_layers) * 1e3  # noqa: E731
        print("per layer of a pass, ms (CPU attention / worker waits for q/k/v / executor waits for attention / "
              "target GPU): " + ", ".join(f"{r['mode']} " + " / ".join(f"{ms(r, key):.1f}" for key in keys)
                                          for r in per_layer))
    gaps = [r for r in results if r.get("passes") and r.get("driver_s") is not None]
    if gaps:
        # What a pass's turn-around costs beside the pass: drafting on the GPU, the generator's
        # loop (its results applied, rows refilled, proposals asked) and issuing the next pass.
        ms = lambda r, key: (r.get(key) or 0.0) / r["passes"] * 1e3  # noqa: E731
        print("per pass, ms (draft GPU / generator loop / issuing the pass): " + ", ".join(
            f"{r['mode']} " + " / ".join(f"{ms(r, key):.1f}" for key in ("draft_gpu_s", "driver_s", "pass_submit_s"))
            for r in gaps))
    hosts = [r for r in results if r.get("host_busy") is not None]
    if hosts:
        # Who kept the host's CPUs busy during each run (a first run slower than a second: W4).
        print("host CPUs during the run (share busy; processes over half a core): " + ", ".join(
            f"{r['mode']} {r['host_busy']:.0%}" + "".join(f"; {p['name']} {p['cores']:.1f}"
                                                          for p in r.get("host_busy_processes") or [])
            for r in hosts))
    faulted = [r for r in results if r.get("worker_minor_faults") is not None]
    if faulted:
        # A run first in its process was slower on W4 (memory_facts): how its host KV was backed.
        print("CPU worker memory (minor page faults this run; GiB in huge pages once its KV cache was made; "
              "freed memory kept): " + ", ".join(
                  f"{r['mode']} {r['worker_minor_faults']:,}; {r.get('worker_anon_huge_gib')}; "
                  f"{r.get('worker_keeps_freed_memory')}" for r in faulted))
    vms = [r for r in results if r.get("host_vm")]
    if vms:
        # Whether the kernel reclaimed, compacted or collapsed memory during a run (memory_facts).
        grew = lambda r: "".join(f"; {k} {v:,}" for k, v in r["host_vm"].items() if v)  # noqa: E731
        print("host memory during the run (GiB available at its start; /proc/vmstat counters that grew): " +
              ", ".join(f"{r['mode']} {r.get('host_mem_available_gib')}{grew(r)}" for r in vms))
    if any(r.get("k_counts") for r in results):
        print("draft lengths (k: passes): " + ", ".join(
            f"{r['mode']} " + " ".join(f"{k}:{n}" for k, n in r["k_counts"].items()) for r in results if r.get("k_counts")))
        drains = [(r["mode"], d) for r in results if (d := drain_k(r))]
        if drains:
            print("mean k and s/pass by busy rows (a full batch; draining below half): " + ", ".join(
                f"{m} {d['full'][0]:.2f} at {d['full'][1]:.3f} s; {d['drain'][0]:.2f} at {d['drain'][1]:.3f} s "
                f"({d['drain'][2]} passes)" for m, d in drains))
    fair = max((r for r in results if r["mode"].startswith("none+r")), key=lambda r: r["tokens_per_s"], default=None)
    if fair:
        rows = f", {fair['gpu_kv_rows']} rows' KV" if fair.get("gpu_kv_rows") else ""
        print(f"against {fair['mode']} (none keeping {resident} target layers{rows} on the GPU, own actors): " +
              ", ".join(f"{r['mode']} {r['tokens_per_s'] / fair['tokens_per_s']:.2f}x e2e "
                        f"{r['decode_tokens_per_s'] / fair['decode_tokens_per_s']:.2f}x decode"
                        for r in results if r is not fair))


def drain_k(r: dict) -> dict | None:
    """Mean k and seconds per pass over a mode's passes at a full batch and at under half of it
    (adaptive k keys pass times on busy rows: a draining batch may draft longer blocks), with
    the count of the latter; None without both kinds of passes."""
    log = [p for p in r.get("pass_log") or [] if len(p) > 3]
    groups = {"full": [p for p in log if p[3] >= r["batch"]], "drain": [p for p in log if 2 * p[3] < r["batch"]]}
    if not all(groups.values()):
        return None
    return {g: (statistics.fmean(p[0] for p in ps), statistics.fmean(p[1] for p in ps), len(ps))
            for g, ps in groups.items()}


def main(argv=None):
    from specoffload.cli import one_line_errors

    try:  # an engine error (a mode out of GPU memory, say) is one line too, not Ray's tracebacks
        return one_line_errors("specoffload bench", _main, argv)
    except BenchError as e:
        print(f"specoffload bench: error: {e}", file=sys.stderr)
        return 2


def _main(argv):
    from specoffload.errors import CapacityError, ConfigError, SpecOffloadError
    from specoffload.sources.constructed import constructed_pair

    a = _options(argv)
    if a.accelerate and a.workload.startswith(("w3", "w4")):
        raise BenchError(f"--accelerate builds W1's Mixtral-shaped target, not {a.workload}'s")
    if a.repeat < 1:
        raise BenchError(f"--repeat needs a count of 1 or more, got {a.repeat}")
    tspec, dspec = workload_shapes(a.workload, a.target_layers, a.draft_layers)
    tsrc, dsrc = constructed_pair(tspec, dspec, a.agreement)
    if a.target_fp8 or a.workload.startswith("w4"):  # W4 is fp8: 141 GB of bf16 fits no host here
        from specoffload.sources.fp8_quantize import Fp8Quantized

        tsrc = Fp8Quantized(tsrc)
        tspec = tsrc.spec
    cuda = torch.cuda.is_available()
    if a.batch == "max":
        a.batch = _largest_batch(a, tspec, dspec, cuda)
    a.resident = _resident(a, tspec, dspec, cuda)
    a.gpu_kv_rows = _gpu_kv_rows(a, tspec, dspec, cuda)
    lists = SettingLists.parse(a, cuda)  # bad lists fail first
    plan = _plan(a, lists, cuda)
    try:
        modes = parse_modes(a.modes, a.k)
    except ValueError as e:
        raise BenchError(e) from None
    resident, baseline_error, baseline_rows = None, None, [0]
    failed = []  # "<mode> failed: <why>" for each mode that failed (the others still run)
    if a.baseline_resident is not None:
        try:
            resident = _baseline_resident(a, tspec, cuda)
        except (ConfigError, ValueError) as e:
            raise BenchError(f"--baseline-resident: {e}") from None
        try:
            baseline_rows = _baseline_gpu_kv_rows(a, tspec, resident, cuda)
        except (ConfigError, CapacityError, ValueError) as e:
            raise BenchError(f"--baseline-gpu-kv-rows: {e}") from None
    elif a.baseline_gpu_kv_rows != "0":
        raise BenchError("--baseline-gpu-kv-rows needs --baseline-resident")
    elif a.baseline_copy_chunk_mib is not None:
        raise BenchError("--baseline-copy-chunk-mib needs --baseline-resident")
    elif a.baseline_switches != "all":
        raise BenchError("--baseline-switches needs --baseline-resident")
    from specoffload.ray_env import check_cluster, ensure_ray

    host = host_facts.snapshot()  # before Ray's own processes start
    print(host_facts.describe(host), flush=True)
    busy = host_facts.warning(host)
    if busy:  # beside the figures it qualifies; stderr holds only errors, in one line
        print(busy, flush=True)
    try:
        ensure_ray(a.ray_address, dashboard=a.dashboard,
                   object_store=int(os.environ.get("OBJ_STORE", 6 * 2**30 if cuda else 2**30)))
        check_cluster()
    except SpecOffloadError as e:
        raise BenchError(e) from None
    bench = Bench(a, plan, tspec, tsrc, lists)
    bench.many_micro = len(lists.micro_batches) > 1  # then each mode's label names its micro-batch count
    try:
        bench.start(plan, None if a.no_draft else ("object", dsrc), "actors")
    except SpecOffloadError as e:
        ray.shutdown()
        raise BenchError(e) from None
    try:
        if not a.no_warmup:
            bench.warm_up(modes)
        runs = [(label, spec, s) for label, spec in modes.items() for s in lists.runs(a.resident, spec[4])]
        for bench.repetition in range(1, a.repeat + 1):
            if not all(bench.run_or_record(failed, label, spec, s) for label, spec, s in runs):
                break
        bench.repetition = 1  # the baseline runs once, unnamed
        bench.stop()
        if resident:
            baseline_error = bench.baseline(resident, baseline_rows)
    except BaseException:
        # A run cut short (an error, Ctrl-C) must not leave the loader's weights in /dev/shm.
        try:
            bench.stop(timeout=120)
        except Exception:  # noqa: BLE001 - already shut down, or the actor is gone
            pass
        raise
    ray.shutdown()  # its object store too: accelerate builds the whole target in host memory
    accel, accel_error = None, None
    if a.accelerate:
        from specoffload import bench_accelerate

        try:
            accel = bench_accelerate.run(a.accelerate, bench.prompts, a.target_layers, a.gpu_memory)
        except RuntimeError as e:
            accel_error = f"transformers + accelerate did not run: {e}"
    print_table(a, tspec, bench.results, bench.layer_bytes, resident)
    if accel:
        from specoffload import bench_accelerate

        print(bench_accelerate.against(accel, bench.results))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a) | {"accelerate": vars(a.accelerate) if a.accelerate else None},
                       "host": host, "results": bench.results, "accelerate": accel, "failed": failed}, f, indent=1)
    if failed or baseline_error or accel_error:
        raise BenchError("; ".join(e for e in (*failed, baseline_error, accel_error) if e))
    return 0


def _mode_failure(e: BaseException) -> tuple[str, bool]:
    """A failed mode's error in one line, and whether its actors can run the next mode: after an
    error the engine reports as its own (a pass out of GPU memory, say) the same actors run on,
    as `LLM` does (tests/test_doorbell.py); after an actor's death or a stalled pass they cannot."""
    from specoffload.actors.actor_backend import PassStalled
    from specoffload.actors.guard import user_error
    from specoffload.errors import SpecOffloadError, root_cause

    cause = root_cause(e)
    shown = user_error(e, None) if isinstance(e, ray.exceptions.RayError) else e
    lines = str(shown).strip().splitlines()
    why = lines[-1] if lines else type(e).__name__
    reusable = (isinstance(cause, SpecOffloadError) and not isinstance(cause, PassStalled)
                and not isinstance(e, ray.exceptions.RayActorError))
    return why, reusable


if __name__ == "__main__":
    sys.exit(main())
