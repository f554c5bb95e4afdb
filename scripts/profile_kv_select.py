"""What the CPU worker's keep of finished rows copies and costs: `KVCache.select` on a host cache
of w1-long's shape, against copying each moved row's whole capacity (what it did before 88e4a27).

Row lengths are drawn from w1-long's job (`bench_job.JobShape`: a row holds its prompt and a
uniform share of its output); the rows past the new end move into the holes of `--moved`
finished rows. Prints, per count of moved rows, the mean positions copied and the median ms of
each way over `--trials` keeps.

    python scripts/profile_kv_select.py --rows 192 --moved 3,5,8 --trials 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from specoffload.bench_job import JobShape
from specoffload.models.attention import KVCache
from specoffload.placement.gpu_kv_rows import fill_holes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=192)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--moved", default="3,5,8", help="comma list: finished rows per keep")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    job = JobShape()
    rng = np.random.default_rng(a.seed)
    capacity = job.prompt_hi + job.gen_hi + 16 + 2  # the generator's: longest request + k_max + 2
    prompts, gens = job.prompt_lengths(rng), job.gen_lengths(rng)
    cache = KVCache(a.layers, a.rows, a.kv_heads, a.head_dim, capacity, torch.bfloat16)
    print(f"host KV cache: {a.layers} layers x K/V x [{a.rows}, {a.kv_heads}, {capacity}, {a.head_dim}] bf16, "
          f"{torch.get_num_threads()} threads")
    print(f"{'moved':>5s} {'positions copied':>16s} {'select ms':>10s} {'whole rows ms':>14s}")
    for moved in map(int, a.moved.split(",")):
        used, ours, whole = [], [], []
        for _ in range(a.trials):
            pick = rng.choice(len(prompts), a.rows, replace=False)
            lens = prompts[pick] + rng.integers(0, gens[pick] + 1)
            finished = rng.choice(a.rows - moved, moved, replace=False)  # holes below the new end
            keep = fill_holes([i for i in range(a.rows) if i not in set(finished.tolist())])
            cache.lens = torch.as_tensor(lens, dtype=torch.long)
            cache.k, cache.v = list(cache._base[0]), list(cache._base[1])  # select left views of fewer rows
            idx = torch.tensor(keep)
            move = idx != torch.arange(len(keep))
            dst, src = torch.arange(len(keep))[move], idx[move]
            used.append(int(cache.lens[src].max()))
            t = time.perf_counter()
            for x in cache.k + cache.v:  # the old way: each moved row's whole capacity
                x[dst] = x[src]
            whole.append(time.perf_counter() - t)
            t = time.perf_counter()
            cache.select(torch.tensor(keep))
            ours.append(time.perf_counter() - t)
        print(f"{moved:5d} {statistics.mean(used):10.0f} of {capacity} {1e3 * statistics.median(ours):10.1f} "
              f"{1e3 * statistics.median(whole):14.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
