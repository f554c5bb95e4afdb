"""Placement as data: what lives where, and how big the batches are.

A frozen, self-checking dataclass that the coordinator and actors follow; msgpack- and
JSON-serialisable so a planner (or a `configs/*.json` file) can produce it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import msgpack

from ..errors import ConfigError
from .draft_kv import DraftKV
from .json_file import JsonFile

_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}


def parse_bytes(x) -> int | None:
    """'24GiB' / '512MB' / 1234 -> bytes; None stays None."""
    if x is None or isinstance(x, int):
        return x
    s = str(x).strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    if unit not in _UNITS or not num:
        raise ConfigError(f"cannot read a size from {x!r} (use e.g. 24GiB, 512MB)")
    return int(float(num) * _UNITS[unit])


def split_range(n: int, parts: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges of `parts` near-equal, non-empty micro-batches of n sequences."""
    parts = max(1, min(parts, n))
    return [(n * p // parts, n * (p + 1) // parts) for p in range(parts)]


@dataclass(frozen=True)
class Plan(JsonFile):
    json_what = "plan"

    device: str = "cpu"  # where the executor computes: "cuda" or "cpu"
    gpu_memory: int | None = None  # executor memory cap in bytes (enforced on CUDA)
    gpu_layers: tuple = ()  # target layers kept resident on the executor's device
    disk_layers: tuple = ()  # target layers left on disk, staged per pass by the loader
    num_slots: int = 2  # device buffers that streamed layers rotate through
    batch_size: int = 64  # sequences per batch
    prefill_batch: int = 16  # sequences per prefill sub-batch (each layer loaded once for all)
    kv_dtype: str | None = None  # target KV cache dtype in host memory (None = model dtype)
    attention_threads: int | None = None  # torch threads of the CPU attention worker
    attention_cpus: float = 1.0  # Ray num_cpus of the CPU attention worker
    # The draft's KV cache, flat for plan files (`draft_kv_policy` is the one value, DraftKV):
    draft_window: int | None = None  # the draft attends over the last W tokens (KV ring); None = all
    draft_kv_fp8: bool = False  # store the draft's windowed KV in fp8 (e4m3, scale per head)
    draft_sinks: int = 0  # the windowed draft also keeps each sequence's first N tokens
    # keep the draft's layer matrices in fp8 (one scale per row, models/fp8_weights.py): half its
    # GPU memory, for target layers or slots; a separate draft checkpoint only, not self:N
    draft_fp8: bool = False
    draft_graphs: bool = True  # replay the windowed draft's one-token steps as CUDA graphs (on CUDA)
    # where steps are graphed, the draft feeds itself its last proposal each round, so that the
    # next round's first step is a one-token (graphed) step too (SpecRunner.feed_last)
    draft_feed_last: bool = True
    # rows joining a running batch have the draft read their prompts on a thread and stream of
    # their own, beside the batch's draft round and pass (SpecRunner.prime_beside)
    draft_prime_beside: bool = True
    draft_kv: str = "gpu"  # where the draft's KV lives: placement/draft_kv.py's PLACEMENTS
    trace: bool = False  # keep a Chrome-trace timeline of stage spans in the actors
    # Each target pass runs a batch as this many micro-batches, layer by layer, so the CPU
    # attention of one overlaps the GPU work of the next (the per-layer round trip of a whole
    # batch can outlast the next layer's weight copy).
    micro_batches: int = 1
    # A pass's q/k/v and attention outputs cross between the executor and the CPU worker in
    # page-locked /dev/shm buffers set up once per micro-batch (actors/mailbox.py); False: as
    # arrays in Ray's object store (the plain path, kept to test the fast one against).
    shm_activations: bool = True
    # With them on CUDA: a GPU kernel reads each attention output from the page-locked mailbox
    # rather than a DMA, which queues behind the weight copy's pieces (ExecutorMailboxes.recv_out).
    # w1-long on the GPU machine: 2.96x plain against 2.88x with DMAs, 2.86x against 2.79x at
    # another refill size (docs/benchmarks.md, W1-long "Session 41"). No effect off CUDA.
    mapped_out: bool = True
    # While a layer's weights still copy, the executor finishes the previous layer for a
    # batch's later parts whose attention is back (GPUExecutor._post_arrived), freeing that
    # layer's slot for the next copy sooner. Off until measured on the GPU machine.
    early_posts: bool = False
    # The target's prefill runs each layer's elementwise work (norms with their fp8 input
    # quantization, RoPE, act * up) fused by torch.compile (models/fused.py): the same values,
    # fewer kernels. W4 on the GPU machine: a prefill layer 10.36 ms against 12.28, the run's
    # prefill 20.15 s against 22.61 (docs/benchmarks.md, W4 "Session 41"). Compiles on the first
    # prefill (seconds). None: on where the plan's device is CUDA (a CPU compiles slowly and
    # its eager kernels lose less).
    fused_prefill: bool | None = None
    # The CPU worker's host KV cache asked for in 2 MiB pages (models/huge_pages.py), where the
    # kernel's transparent huge pages allow: CPU attention streams it every layer. Off: on one
    # H100's 14 threads a W4-shaped layer's attention took 9.0 ms in huge pages against 8.4 in
    # small ones (docs/benchmarks.md, W4 "Session 43").
    kv_huge_pages: bool = False
    # The CPU worker's process keeps the memory it frees (host_malloc.py): glibc otherwise maps
    # each layer's large temporaries afresh and the next layer faults them in again, page by
    # page. On one H100's 14 threads a W4-shaped layer (72 rows, 64/8 heads, 5 queries over
    # 640 keys) attended in 9.7 and 10.5 ms with it against 13.9 and 11.9 without, 4,057 minor
    # faults a layer against none (docs/benchmarks.md, W4 "Session 44").
    keep_freed_memory: bool = True
    # Inside a pass the executor and the CPU worker hand each layer over by a counter in the
    # mailbox (actors/doorbell.py) instead of through Ray's submitter, every call queued up
    # front: takes Ray's messages out of the layer chain (W1 fp8 speculative 360.5 -> 408.8
    # tok/s on the GPU machine, docs/benchmarks.md "Session 18"). Off with shm_activations.
    layer_doorbell: bool = True
    # With doorbells, the CPU worker attends a pass's layers between its first and last in one
    # call (CPUAttention.attend_layers) instead of a call per layer and micro-batch: each call
    # cost the worker ~1 ms of Ray's time on W4, where it bounds the layer (docs/benchmarks.md,
    # W4 "Session 32"). False: a call each (the plain path it is tested against).
    worker_layer_runs: bool = True
    # The prefill's K/V cross to the CPU worker through a ring of page-locked /dev/shm slots
    # (actors/kv_ring.py) instead of Ray's object store (W1 fp8 prefill 9.16 -> 7.33 s on the
    # GPU machine, docs/benchmarks.md "Session 18"); off with shm_activations (the plain path).
    shm_prefill: bool = True
    # Rows joining a running batch prefill each layer on a CUDA stream of their own beside the
    # pass's parts, the executor going on to the parts without waiting for it; the CPU worker
    # stores their K/V a layer late (ActorBackend._overlaps; needs shm_prefill). Off: on the
    # GPU machine it took a join pass's layers from 42.5 to 35.5 ms but gained nothing end to
    # end (w1-long 1873.2 tok/s against 1901.3 in line, one call; the prefill's kernels share
    # the device with the pass's, and the join's head then waits for its last layer;
    # docs/benchmarks.md, W1-long "Session 35"). False: in line with the parts.
    join_overlap: bool = False
    # The CPU worker's attention runs rows of different lengths in ranges of similar ones
    # (models/attention.ragged_chunks, this many keys the fixed cost of a call) instead of one
    # call padded to the longest row. None (off) until measured with the GPU machine's threads
    # (docs/benchmarks.md, "Ragged rows").
    ragged_attention: int | None = None
    # The CPU worker's SDPA calls take at most this many query rows per K/V head (0: no limit;
    # None: models/attention.CPU_QUERY_ROWS, 63, which keeps torch's CPU kernel from repacking
    # K/V for a block of 64+ rows: 1.77x on W4's k 7 blocks, docs/benchmarks.md "Session 23").
    cpu_query_rows: int | None = None
    copy_chunk_mib: int = 64  # weight copies are issued in pieces of this size (see weight_stream.py)
    # The first this many rows of each batch keep their target K/V in GPU memory and attend
    # there, beside the CPU worker's attention for the rest (placement/gpu_kv_rows.py): the
    # CPU's share of a layer's chain shrinks. With micro-batches the GPU rows ride with the
    # first of the CPU rows' parts (placement/gpu_kv_rows.part_ranges).
    gpu_kv_rows: int = 0
    # The target's embedding table stays in host memory (the loader's copy, mapped) instead of
    # being copied to the GPU: a pass gathers its tokens' rows there and copies them over (W4's
    # 192 x 5 tokens: 15 MB), which frees vocab x hidden of GPU memory for KV rows (W4's
    # Llama-3.1-70B: 1.96 GiB, 9 rows of 205.6 MiB). A tied table is also the head, and a
    # self-draft embeds on every draft step: both keep it on the device. Off until measured.
    host_embedding: bool = False
    # A target pass or prefill whose result has not come for this many seconds (or 30 of the
    # run's measured passes, if longer) has stalled: a side waits on something that will not
    # come. The actors are then rebuilt and the run goes on, as when one dies
    # (actors/supervisor.py). 0: wait for ever.
    stall_s: float = 600.0

    def __post_init__(self):
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"plan.device must be 'cpu' or 'cuda', got {self.device!r}")
        object.__setattr__(self, "gpu_memory", parse_bytes(self.gpu_memory))
        object.__setattr__(self, "gpu_layers", tuple(sorted(set(self.gpu_layers))))
        object.__setattr__(self, "disk_layers", tuple(sorted(set(self.disk_layers))))
        if set(self.gpu_layers) & set(self.disk_layers):
            raise ConfigError("a layer cannot be both GPU-resident and on disk")
        if self.num_slots < 2:
            raise ConfigError("num_slots must be >= 2 (double buffering)")
        if self.batch_size < 1 or self.prefill_batch < 1:
            raise ConfigError("batch_size and prefill_batch must be >= 1")
        self.draft_kv_policy  # checks the draft KV fields
        if self.copy_chunk_mib < 1:
            raise ConfigError(f"copy_chunk_mib must be >= 1, got {self.copy_chunk_mib}")
        if self.fused_prefill is None:
            object.__setattr__(self, "fused_prefill", self.device == "cuda")
        if not self.shm_activations:  # the plain path: everything through Ray's object store
            object.__setattr__(self, "shm_prefill", False)
            object.__setattr__(self, "layer_doorbell", False)
        if self.ragged_attention is not None and self.ragged_attention < 0:
            raise ConfigError(f"ragged_attention must be >= 0 keys (or None: off), got {self.ragged_attention}")
        if self.cpu_query_rows is not None and self.cpu_query_rows < 0:
            raise ConfigError(f"cpu_query_rows must be >= 0 (0: no limit; None: the default), got {self.cpu_query_rows}")
        if not 1 <= self.micro_batches <= 64:
            raise ConfigError(f"micro_batches must be in 1..64, got {self.micro_batches}")
        if self.gpu_kv_rows < 0:
            raise ConfigError(f"gpu_kv_rows must be >= 0, got {self.gpu_kv_rows}")
        if self.stall_s < 0:
            raise ConfigError(f"stall_s must be >= 0 seconds (0: no limit), got {self.stall_s}")
        if self.gpu_memory is not None and self.gpu_memory <= 0:
            raise ConfigError("gpu_memory must be positive")

    @property
    def draft_kv_policy(self) -> DraftKV:
        return DraftKV(self.draft_kv, self.draft_window, self.draft_sinks, self.draft_kv_fp8)

    def with_draft_kv(self, kv: DraftKV) -> "Plan":
        return replace(self, draft_kv=kv.placement, draft_window=kv.window, draft_sinks=kv.sinks,
                       draft_kv_fp8=kv.fp8)

    def check_layers(self, num_layers: int):
        bad = [j for j in self.gpu_layers + self.disk_layers if not 0 <= j < num_layers]
        if bad:
            raise ConfigError(f"plan names layers {bad} but the model has {num_layers}")

    def streamed_layers(self, num_layers: int) -> list[int]:
        return [j for j in range(num_layers) if j not in self.gpu_layers]

    def to_msgpack(self) -> bytes:
        return msgpack.packb(asdict(self))

    @classmethod
    def from_msgpack(cls, data: bytes) -> "Plan":
        return cls(**msgpack.unpackb(data))
