"""What the planner knows about a machine: a few measured figures, kept as a self-checking
dataclass that a JSON file can hold (so a plan can be made for a machine you are not on, and
re-made without measuring again).

`measure()` times each figure on this machine in a few seconds: the pinned host-to-device copy
that bounds a streamed pass, the device's memory bandwidth and matmul rate (the draft and the
target's FFN), and the engine's own CPU attention (its KV read rate and its arithmetic rate, since
a verification block of k+1 queries costs more than one query over the same keys).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass

from ..errors import ConfigError
from .json_file import JsonFile
from .plan import parse_bytes

GB = 1e9


@dataclass(frozen=True)
class Hardware(JsonFile):
    json_what = "hardware"

    device: str  # where the executor computes: "cuda" or "cpu"
    gpu_memory: int  # bytes the executor may use (the cap, or the device's total)
    host_memory: int  # bytes of host RAM free for the target's weights and KV cache
    h2d_GBps: float  # pinned host -> device copy (the streamed pass's floor)
    device_GBps: float  # device memory bandwidth (a draft step reads all its weights)
    device_tflops: float  # dense matmul rate in the model dtype at a batch-sized M
    cpu_kv_GBps: float  # CPU attention: bytes of K/V read per second
    cpu_attention_gflops: float  # CPU attention: arithmetic per query over the keys
    cpu_cores: int = 1
    disk_GBps: float = 2.0  # reading layers left on disk (not measured: set it for your disk)
    measured: str = ""  # how the figures were obtained (command, machine, date)

    def __post_init__(self):
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"hardware.device must be 'cpu' or 'cuda', got {self.device!r}")
        object.__setattr__(self, "gpu_memory", parse_bytes(self.gpu_memory))
        object.__setattr__(self, "host_memory", parse_bytes(self.host_memory))
        for f in ("gpu_memory", "host_memory", "h2d_GBps", "device_GBps", "device_tflops", "cpu_kv_GBps",
                  "cpu_attention_gflops", "cpu_cores", "disk_GBps"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or v <= 0:
                raise ConfigError(f"hardware.{f} must be a positive number, got {v!r}")

    def with_gpu_memory(self, cap) -> "Hardware":
        from dataclasses import replace

        return self if cap is None else replace(self, gpu_memory=parse_bytes(cap))

    def to_dict(self) -> dict:
        return asdict(self)


def mem_available() -> int:
    """The kernel's MemAvailable (what can be allocated without swapping), in bytes."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def host_memory_available() -> int:
    """mem_available(), bounded by what /dev/shm (where the loader puts the weights) can hold."""
    avail = mem_available()
    try:
        avail = min(avail, shutil.disk_usage("/dev/shm").free)
    except OSError:
        pass
    return avail


def _best(f, repeats: int) -> float:
    f()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def attention_rates(queries: list[int], seconds: list[float], kv_bytes: float, flops_per_query: float,
                    matmul_gflops: float) -> tuple[float, float]:
    """(KV read GB/s, arithmetic GFLOP/s) of CPU attention from its time at several query counts
    over the same keys: the least-squares line's intercept is the read, its slope one query's
    arithmetic. The arithmetic is never counted faster than the CPU's matmul rate (a flat or
    falling line is noise, not free arithmetic), nor the read shorter than a tenth of one query's
    whole time."""
    import numpy as np

    slope, read = (float(x) for x in np.polyfit(queries, seconds, 1))
    gflops = min(flops_per_query / slope / 1e9, matmul_gflops) if slope > 0 else matmul_gflops
    return kv_bytes / max(read, seconds[0] * 0.1) / GB, gflops


def _matmul_flops(shape: tuple[int, int, int], dtype, device, reps: int, sync=lambda: None) -> float:
    """FLOP/s of the best of `reps` (m, k) @ (k, n) products."""
    import torch

    m, k, n = shape
    x, w = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
    return 2 * m * k * n / _best(lambda: (x @ w, sync()), reps)


def measure(device: str = "auto", gpu_memory=None, threads: int | None = None, quick: bool = False) -> Hardware:
    """Time this machine's figures (a few seconds; `quick`: smaller sizes, for tests).

    A GPU is measured from a child process: a CUDA context in the caller would stay on the
    card for the whole run and take memory the executor was planned to have."""
    import torch

    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
            return pool.submit(_measure, "cuda", gpu_memory, threads, quick).result()
    return _measure(device, gpu_memory, threads, quick)


def _measure(device: str, gpu_memory, threads: int | None, quick: bool) -> Hardware:
    import torch

    from ..models.attention import KVCache

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("cannot measure a CUDA device: torch sees no GPU here")
    dev = torch.device(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    reps = 2 if quick else 5
    mib = 16 if quick else 256

    # pinned host -> device copy (on a CPU executor the "copy" is a memcpy out of shared memory)
    src = torch.empty(mib << 20, dtype=torch.uint8, pin_memory=device == "cuda")
    dst = torch.empty(mib << 20, dtype=torch.uint8, device=dev)
    h2d = (mib << 20) / _best(lambda: (dst.copy_(src, non_blocking=True), sync()), reps) / GB
    # device memory: a copy reads and writes each byte
    a = torch.empty(mib << 20, dtype=torch.uint8, device=dev)
    dev_bw = 2 * (mib << 20) / _best(lambda: (a.copy_(dst), sync()), reps) / GB
    # matmul at a batch-sized M, in the dtype the models run in
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    shape = (64, 256, 512) if quick else ((1024, 4096, 14336) if device == "cuda" else (256, 1024, 2048))
    tflops = _matmul_flops(shape, dt, dev, reps, sync) / 1e12

    # The engine's CPU attention, Mixtral-like heads (32 query, 8 KV, d 128), bf16 cache: 1 to 16
    # queries per sequence over the same keys (k reaches 15), read + arithmetic fitted through
    # all four. 16 queries split a head's 64 rows into two SDPA calls (CPU_QUERY_ROWS), a cost
    # the engine pays. Two points (1 and 8) were too few: in session 26's GPU check the plan ran
    # beside four engine runs, 8 queries timed no slower than 1, the arithmetic came out free
    # (1.08e9 GFLOP/s) and the planner chose k 15. At 32 sequences the H200 host measured 677
    # GFLOP/s per query, a third of what W1's fp8 pass traced at 192 (docs/benchmarks.md).
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        B, keys = (4, 64) if quick else (128, 512)
        Hq, Hkv, d = 32, 8, 128
        cache = KVCache(1, B, Hkv, d, keys + 17, torch.bfloat16)
        for t in cache.k + cache.v:
            t.normal_()

        def attn(nq):
            q_lens = torch.full((B,), nq)
            q, k, v = (torch.randn(B * nq, h, d, dtype=torch.bfloat16) for h in (Hq, Hkv, Hkv))

            def once():
                cache.lens.fill_(keys)
                cache.begin_pass(q_lens, B * nq, nq)
                cache.attend_layer(0, q, k, v)
            return _best(once, reps)

        queries = (1, 4, 8, 16)
        times = [attn(n) for n in queries]
        # The ceiling on the arithmetic: the faster of a float32 and a bf16 matmul. bf16 is the
        # faster on CPUs with AMX and hundreds of times slower without it (0.3 GFLOP/s against
        # float32's 160 on the 2-core development machine), hence its small size.
        matmul_gflops = max(_matmul_flops((64, 256, 512) if quick else (256, 1024, 1024), torch.float32, "cpu", reps),
                            _matmul_flops((64, 256, 512) if quick else (128, 512, 512), torch.bfloat16, "cpu", reps)) / 1e9
        cpu_kv, cpu_gflops = attention_rates(list(queries), times, kv_bytes=2 * B * (keys + 1) * Hkv * d * 2,
                                             flops_per_query=4 * B * (keys + 4) * Hq * d,  # q.k and p.v
                                             matmul_gflops=matmul_gflops)
    finally:
        torch.set_num_threads(old_threads)

    host = host_memory_available()
    total = torch.cuda.get_device_properties(dev).total_memory if device == "cuda" else host
    cap = parse_bytes(gpu_memory) if gpu_memory is not None else total
    def sig(x: float) -> float:  # three significant digits: a slow CPU's rates are small, not zero
        return float(f"{x:.3g}")

    return Hardware(device=device, gpu_memory=min(cap, total), host_memory=host,
                    h2d_GBps=sig(h2d), device_GBps=sig(dev_bw), device_tflops=sig(tflops),
                    cpu_kv_GBps=sig(cpu_kv), cpu_attention_gflops=sig(cpu_gflops),
                    cpu_cores=os.cpu_count() or 1,
                    measured=f"placement.hardware.measure on {os.uname().nodename}, "
                             f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}")
