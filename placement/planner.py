"""The planner: from a machine's figures, the models and the workload, the placement, the batch
size, the schedule and the draft's settings that the cost model predicts to be fastest.

Every candidate is enumerated, checked against device and host memory, and timed with
`cost_model`; the table of all of them is kept, so a user (or a test) can see why one won.
Candidates: no speculation; with a draft, its KV whole on the GPU, or windowed (bf16 or fp8,
several windows), or kept in host memory, or recomputed per round; single-batch or dual-batch
schedule; the draft's matrices in bf16 or fp8. Whatever GPU memory a candidate leaves goes to
more weight slots where they hide drafting (they load the next pass's first layers while the
draft runs), else to resident target layers; target layers that host memory cannot hold go to
disk. The chosen draft length is a start: the run adapts k from measured acceptance
(`adaptive_k`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from ..errors import CapacityError, ConfigError
from ..models.fp8_weights import SELF_DRAFT_REFUSAL
from ..models.spec import ModelSpec
from ..scheduler.schedule import expected_tokens
from . import cost_model as cmod
from . import refill
from .cost_model import CostModel
from .draft_kv import PLACEMENTS, DraftKV
from .hardware import Hardware
from .plan import Plan
from .resident_layers import resident_layers

WINDOWS = (64, 128, 256)
# Most weight slots a plan gets: up to 4 hid drafting as the cost model says on W1, a 5th did
# not, for reasons not yet known (docs/benchmarks.md).
MAX_SLOTS = 4
SINKS = 4
K_MAX = 16


@dataclass(frozen=True)
class Workload:
    prompt_len: int  # tokens per prompt (the longest, for memory)
    gen_len: int  # tokens to generate per request
    requests: int  # requests in the job
    # Probability that a draft token is the target's (per token; 0.8 gives at most 5 tokens per
    # sequence per pass). Measure it for your pair (scripts/measure_acceptance.py).
    acceptance: float = 0.7
    # (window, acceptance) pairs: what a draft windowed to W tokens agrees at (a window can cost
    # much acceptance on long prompts: docs/benchmarks.md, W2). Windows not listed get
    # `acceptance`; give the pairs, or the planner takes the cheapest window as no worse.
    window_acceptance: tuple = ()
    # Whether rows may be refilled in place when requests outnumber them (else: waves)
    refill: bool = True

    def __post_init__(self):
        if min(self.prompt_len, self.gen_len, self.requests) < 1:
            raise ConfigError("workload prompt_len, gen_len and requests must be >= 1")
        object.__setattr__(self, "window_acceptance", tuple(sorted((int(w), float(a)) for w, a in
                                                                   dict(self.window_acceptance).items())))
        for a in (self.acceptance, *(a for _, a in self.window_acceptance)):
            if not 0.0 <= a < 1.0:
                raise ConfigError(f"acceptance must be in [0, 1), got {a}")

    def acceptance_for(self, window: int | None) -> float:
        return dict(self.window_acceptance).get(window, self.acceptance) if window else self.acceptance

    @property
    def context(self) -> int:
        return self.prompt_len + self.gen_len


@dataclass(frozen=True)
class Candidate:
    schedule: str  # "none", "single" or "dual"
    batch: int  # sequences per batch (dual: per each of the two)
    k: int = 0
    kv: DraftKV = DraftKV()  # where the draft's KV lives, its window and sinks, fp8 or not
    draft_fp8: bool = False  # the draft's layer matrices in fp8
    resident: int = 0  # target layers kept on the GPU
    self_layers: int = 0  # of them the first ones, a self-draft's (--draft self:N), the rest spread
    slots: int = 2  # device buffers the streamed layers rotate through
    spare: int = 0  # layers' worth of GPU memory left over, for resident layers or more slots
    disk: int = 0  # target layers left on disk
    gpu_kv_rows: int = 0  # each batch's first rows with their target KV on the GPU (placement/gpu_kv_rows.py)
    micro_batches: int = 1  # parts a pass runs the batch in (plan.micro_batches)
    prefill_batch: int = 16
    host_embedding: bool = False  # the target's embedding table left in host memory (plan.host_embedding)
    gpu_bytes: int = 0
    host_bytes: int = 0
    fits: bool = True
    why: str = ""  # what did not fit
    pass_s: float = 0.0  # one target pass at this k
    draft_s: float = 0.0  # drafting per round
    rounds: float = 0.0  # per wave (batch), its slowest sequence's
    refill: bool = False  # rows refilled in place (placement/refill.py) rather than waves
    refill_rows: int = 0  # free rows a join waits for
    seconds: float = math.inf  # the whole workload
    tokens_per_s: float = 0.0

    @property
    def draft_kv(self) -> str:
        return self.kv.placement

    @property
    def window(self) -> int | None:
        return self.kv.window

    @property
    def fp8(self) -> bool:  # the draft's KV ring in fp8
        return self.kv.fp8

    @property
    def in_flight(self) -> int:
        """Sequences running at once (the dual schedule's two batches)."""
        return self.batch * (2 if self.schedule == "dual" else 1)

    def label(self) -> str:
        parts = f", {self.micro_batches} parts" if self.micro_batches > 1 else ""
        if self.schedule == "none":
            return "none" + parts
        return f"{self.schedule} k={self.k} draft KV {self.kv.label()}{', fp8 draft' if self.draft_fp8 else ''}{parts}"


@dataclass(frozen=True)
class Choice:
    best: Candidate
    plan: Plan
    candidates: tuple = field(default=())
    hardware: Hardware | None = None

    def run_options(self, c: Candidate | None = None) -> dict:
        """The run's settings besides the plan (LLM keyword arguments / CLI flags), of the best
        candidate or of `c`."""
        c = c or self.best
        return {"schedule": c.schedule, "k": max(c.k, 1), "adaptive_k": c.schedule != "none",
                "refill": c.refill, "refill_rows": c.refill_rows}

    def fallbacks(self, n: int = 3) -> list[Candidate]:
        """What to try if the best does not start for want of GPU memory: the fastest of the
        candidates that need less GPU memory than the one tried before, up to n."""
        out, need = [], self.best.gpu_bytes
        for c in sorted((c for c in self.candidates if c.fits), key=lambda c: -c.tokens_per_s):
            if c.gpu_bytes < need and len(out) < n:
                out.append(c)
                need = c.gpu_bytes
        return out


def _gpu_bytes(target, draft, self_layers, c: Candidate, wl: Workload, cm: CostModel) -> int:
    lb = cmod.layer_bytes(target)
    streamed = target.num_layers - c.resident
    slots = c.slots if streamed else 0
    b = cm.cuda_context_bytes + cmod.gpu_glob_bytes(target, c.host_embedding) + cm.workspace_bytes
    b += (c.resident + slots) * lb
    b += cmod.prefill_gpu_bytes(target, min(c.batch, wl.requests), c.prefill_batch, wl.prompt_len)
    b += (c.in_flight // c.batch) * c.gpu_kv_rows * _row_bytes(target, wl)
    if draft is not None and c.schedule != "none":
        if not self_layers:  # a self-draft's layers are the resident target layers
            draft_bytes = cmod.model_bytes(draft, c.draft_fp8)
            b += draft_bytes
            # The draft loads first, one checkpoint layer at a time (quantized on the device
            # when fp8): its own peak, before the slots and resident layers are allocated.
            load_peak = cm.cuda_context_bytes + draft_bytes + cmod.layer_bytes(draft) + cm.workspace_bytes
        else:
            load_peak = 0
        b += c.kv.gpu_sequences(c.in_flight, c.prefill_batch) * c.kv.bytes_per_sequence(draft, wl.context, K_MAX)
        b = max(b, load_peak)
    return b


def _row_bytes(target: ModelSpec, wl: Workload) -> int:
    """One GPU row's target KV, at the capacity the generator gives a row (prompt, output, draft)."""
    return cmod.gpu_row_bytes(target, wl.context + K_MAX + 2)


def gpu_kv_rows_fit(target: ModelSpec, draft: ModelSpec | None, c: Candidate, wl: Workload, gpu_memory: int,
                    cm: CostModel = CostModel()) -> int:
    """GPU rows (plan.gpu_kv_rows) that the GPU memory left beside candidate `c` (its resident
    layers included) holds, by the planner's account, at most its batch: what a hand-set
    placement (`bench --gpu-kv-rows auto`) can use. CapacityError if `c` itself does not fit."""
    need = _gpu_bytes(target, draft, 0, replace(c, gpu_kv_rows=0), wl, cm)
    if need > gpu_memory:
        raise CapacityError(f"GPU needs {need / 2**30:.1f} GiB of {gpu_memory / 2**30:.1f} before any GPU row")
    return _rows_left(target, draft, 0, c, wl, gpu_memory, cm)


def _rows_left(target, draft, self_layers, c: Candidate, wl: Workload, gpu_memory: int, cm: CostModel) -> int:
    """GPU rows that fit beside candidate c's placement (its own rows not counted), at most its
    batch; beside a draft, CostModel.draft_rows_slack_bytes stays free."""
    need = _gpu_bytes(target, draft, self_layers, replace(c, gpu_kv_rows=0), wl, cm)
    if draft is not None and c.schedule != "none":
        need += cm.draft_rows_slack_bytes
    per = (c.in_flight // c.batch) * _row_bytes(target, wl)
    return int(max(min((gpu_memory - need) // per, c.batch), 0))


def _host_bytes(target, draft, c: Candidate, wl: Workload, cm: CostModel) -> int:
    lb = cmod.layer_bytes(target)
    b = (target.num_layers - c.disk) * lb + cmod.glob_bytes(target) + cm.host_reserve_bytes
    b += c.in_flight * (wl.context + K_MAX + 2) * cmod.kv_bytes_per_token_layer(target) * target.num_layers
    if draft is not None:
        b += c.kv.host_sequences(c.in_flight) * c.kv.bytes_per_sequence(draft, wl.context, K_MAX)
    return b


def spare_layers(target: ModelSpec, draft: ModelSpec | None, c: Candidate, wl: Workload, gpu_memory: int,
                 cm: CostModel = CostModel()) -> int:
    """Target layers that the GPU memory left beside candidate `c`'s own placement (slots, draft,
    its KV, prefill) holds, by the planner's account: what a hand-set placement (`bench
    --resident auto`) can keep resident. CapacityError if `c` itself does not fit."""
    need = _gpu_bytes(target, draft, 0, replace(c, resident=0), wl, cm)
    if need > gpu_memory:
        raise CapacityError(f"GPU needs {need / 2**30:.1f} GiB of {gpu_memory / 2**30:.1f} before any resident layer")
    return int(min((gpu_memory - need) // cmod.layer_bytes(target), target.num_layers))


def largest_batch(target: ModelSpec, draft: ModelSpec | None, c: Candidate, wl: Workload, hw: Hardware,
                  cm: CostModel = CostModel(), cap: int = 8192) -> tuple[int, str]:
    """The most sequences a batch of candidate `c`'s kind holds with every target layer in host
    memory (none left on disk) and its own placement on the GPU, by the planner's account: the
    host KV cache grows with the batch, and so does a draft's KV on the GPU. Returns the batch
    and why one more does not fit ('' at `cap`). CapacityError if not even one sequence fits."""
    def why_not(b: int) -> str:
        p = _place(target, draft, 0, replace(c, batch=b), hw, replace(wl, requests=max(wl.requests, b)), cm)
        if not p.fits:
            return p.why
        return f"{p.disk} target layers would be read from disk" if p.disk else ""

    first = why_not(1)
    if first:
        raise CapacityError(f"not even one sequence fits: {first}")
    if not why_not(cap):
        return cap, ""
    lo, hi = 1, cap  # lo fits, hi does not (both hold as the bounds close)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if why_not(mid):
            hi = mid
        else:
            lo = mid
    return lo, why_not(hi)


def _place(target, draft, self_layers, c: Candidate, hw: Hardware, wl: Workload, cm: CostModel) -> Candidate:
    """Resident layers from spare GPU memory, disk layers from missing host memory; or why not."""
    lb = cmod.layer_bytes(target)
    c = replace(c, resident=self_layers if c.schedule != "none" else 0)
    need = _gpu_bytes(target, draft, self_layers, c, wl, cm)
    if need > hw.gpu_memory:
        return replace(c, fits=False, gpu_bytes=need, why=f"GPU needs {need / 2**30:.1f} GiB of "
                                                          f"{hw.gpu_memory / 2**30:.1f}")
    # Spare GPU memory holds target layers (on a CPU executor "GPU" and host are one memory:
    # nothing to gain). All of them resident would also free the two slots; not counted.
    extra = 0 if hw.device == "cpu" else min((hw.gpu_memory - need) // lb, target.num_layers - c.resident)
    c = replace(c, resident=c.resident + int(extra), spare=int(extra))
    c = replace(c, gpu_bytes=_gpu_bytes(target, draft, self_layers, c, wl, cm))
    host = _host_bytes(target, draft, c, wl, cm)
    if host > hw.host_memory:
        over = host - hw.host_memory
        disk = min(math.ceil(over / lb), target.num_layers - c.resident)
        c = replace(c, disk=disk)
        host = _host_bytes(target, draft, c, wl, cm)
        if host > hw.host_memory:
            return replace(c, fits=False, host_bytes=host, why=f"host needs {host / 2**30:.1f} GiB of "
                                                               f"{hw.host_memory / 2**30:.1f} for the KV cache")
    return replace(c, host_bytes=host)


def _time(target, draft, c: Candidate, hw: Hardware, wl: Workload, cm: CostModel) -> Candidate:
    """The whole workload's seconds: waves of `batch` requests, each a prefill then rounds; in
    one micro-batch, or in two where that is 1% faster or more and a part is large enough that
    its own overheads stay small (not under the dual schedule, which interleaves whole batches
    instead): the worker attends for one part while the executor hands the other on
    (cost_model.layer_chain_s). Where the copy bounds every layer they gain nothing."""
    one = _time_parts(target, draft, c, hw, wl, cm)
    if c.schedule == "dual" or c.batch < MICRO_BATCH_MIN_ROWS:
        return one
    two = _time_parts(target, draft, replace(c, micro_batches=2), hw, wl, cm)
    return two if two.seconds < 0.99 * one.seconds else one


def _time_parts(target, draft, c: Candidate, hw: Hardware, wl: Workload, cm: CostModel) -> Candidate:
    """`_time` at c.micro_batches."""
    ctx = wl.prompt_len + wl.gen_len // 2  # the average context over a run
    k = c.k if c.schedule != "none" else 0

    def pass_s(resident, rows=0):  # dual: one batch
        return cmod.target_pass_s(hw, cm, target, c.batch, k + 1, ctx, resident, c.disk, rows, c.micro_batches)

    t_pass = pass_s(c.resident)
    streamed = c.resident < target.num_layers
    waves = math.ceil(wl.requests / (c.in_flight))
    pre = cmod.prefill_s(hw, cm, target, c.in_flight, wl.prompt_len, streamed)
    t_draft = 0.0
    if c.schedule != "none":
        kv_tok = c.kv.tokens(ctx, K_MAX)
        step = cmod.draft_step_s(hw, cm, draft, c.batch, kv_tok, c.fp8, c.draft_fp8)
        t_draft = cm.draft_round_fixed_s + k * step + cmod.draft_kv_round_s(hw, cm, draft, c.kv, c.batch, kv_tok)
        pre += cmod.prefill_s(hw, cm, draft, c.in_flight, wl.prompt_len,
                              streamed=False)
    rounds = cmod.rounds_needed(wl.acceptance_for(c.window), k, min(c.batch, wl.requests), wl.gen_len - 1)
    if c.schedule == "dual":  # a pass verifies A while B drafts; each batch gets every other pass
        per_round = 2 * max(t_pass, t_draft)
    elif c.schedule in ("single", "none") and streamed:
        # Spare memory as resident layers saves a layer's copy minus its chain per pass (little
        # when CPU attention nearly fills a copy, as on W1); as another slot (with a draft), one
        # more layer prefetched while the draft runs; as GPU rows, their attention off the CPU
        # (what pays where the chain bounds a layer, plain decoding's too: w1-long's baseline
        # took 0.199 s a pass with 36 rows beside 5 resident layers against 0.232 without,
        # docs/benchmarks.md W1-long "Session 34"). Each way of splitting it is tried, and the
        # memory short of a whole layer holds rows in each.
        copy = cmod.layer_copy_s(hw, target)
        rows_ok = PRICE_GPU_ROWS and hw.device == "cuda"
        spec = draft if c.schedule != "none" else None
        options = []
        for x in range(min(c.spare, MAX_SLOTS - 2) + 1 if c.schedule == "single" else 1):
            exposed = cmod.exposed_draft_s(cm, t_draft, 2 + x, copy) if c.schedule == "single" else 0.0
            for resident in sorted({c.resident - x, c.resident - c.spare} if rows_ok else {c.resident - x}):
                trial = replace(c, resident=resident, slots=2 + x, gpu_kv_rows=0)
                rows = _rows_left(target, spec, c.self_layers, trial, wl, hw.gpu_memory, cm) if rows_ok else 0
                options += [(pass_s(resident, r) + exposed, x, resident, r) for r in {0, rows}]
        # Rows only where they take 1% or more off the round (as micro-batches): each join moves
        # rows' K/V between the GPU and the host. A tie keeps more layers resident.
        per_round, split, resident, rows = min(
            options, key=lambda o: (o[0] * (1.01 if o[3] else 1.0), o[1], -o[2], o[3]))
        c = replace(c, resident=resident, slots=2 + split, gpu_kv_rows=rows)
        t_pass = pass_s(c.resident, rows)
        if c.schedule == "none":
            per_round = t_pass
    else:
        per_round = t_pass + t_draft
    seconds = refill.waves_seconds(wl.requests, c.in_flight, rounds, per_round, pre)
    refill_rows = 0
    if wl.refill and wl.requests > c.in_flight:
        # Refilled in place: rows at the mean rate, plus what the joins cost (their prefill rides
        # the next pass, except under dual, where rows join at once after a prefill pass).
        tau = expected_tokens(wl.acceptance_for(c.window), k) if k else 1.0
        own = c.schedule == "dual"
        per_row = cmod.prefill_s(hw, cm, target, 1, wl.prompt_len, streamed=False)
        if c.schedule != "none":
            per_row += cmod.prefill_s(hw, cm, draft, 1, wl.prompt_len, streamed=False)
        fixed = (cmod.prefill_s(hw, cm, target, 0, wl.prompt_len, streamed=streamed) if own else 0.0) + \
            (cm.draft_round_fixed_s if c.schedule != "none" else 0.0)
        price = refill.RefillPrice(c.in_flight, per_round, fixed, max(wl.gen_len - 1, 1) / tau)
        refill_rows = price.best_rows()
        refilled = pre / waves + price.seconds(wl.requests, refill_rows) + wl.requests * per_row + \
            price.drain_s(rounds)
        if refilled < seconds:
            seconds = refilled
        else:
            refill_rows = 0
    return replace(c, pass_s=t_pass, draft_s=t_draft, rounds=rounds, seconds=seconds, refill=refill_rows > 0,
                   refill_rows=refill_rows, tokens_per_s=wl.requests * wl.gen_len / seconds)


def _batches(wl: Workload, cap: int = 1024) -> list[int]:
    """Powers of two, and the sizes that split the requests into 1..8 equal waves (or halves of
    them, for the dual schedule's two batches)."""
    top = min(wl.requests, cap)
    out = {b for w in range(1, 9) for b in (math.ceil(wl.requests / w), math.ceil(wl.requests / (2 * w))) if b <= top}
    b = 8
    while b < top:
        out.add(b)
        b *= 2
    return sorted(out)


def plan(target: ModelSpec, draft: ModelSpec | None, hw: Hardware, wl: Workload, *, self_layers: int = 0,
         cm: CostModel = CostModel(), schedules=("none", "single", "dual"), draft_fp8: bool | None = None) -> Choice:
    """The fastest candidate that fits, and every candidate considered.

    `draft` None: only no speculation. `self_layers` N: the draft is the target's first N layers
    (`--draft self:N`), kept on the GPU as resident target layers. `draft_fp8`: a separate
    draft's matrices in fp8 always (True), never (False), or where that is faster (None; its
    acceptance is taken to be the bf16 draft's, as for an fp8 KV ring: measure it)."""
    if self_layers:
        draft = target.with_layers(self_layers)
        if draft_fp8:
            raise ConfigError(SELF_DRAFT_REFUSAL)
    if self_layers or draft_fp8 is False or (draft_fp8 is None and hw.device == "cpu"):
        # A CPU has no fp8 units: torch emulates them, ~100x slower than bf16 (4096 x 14336, 4 rows).
        weight_fp8 = (False,)
    else:
        weight_fp8 = (True,) if draft_fp8 else (False, True)
    unknown = set(schedules) - {"none", "single", "dual"}
    if unknown:
        raise ConfigError(f"unknown schedule(s): {', '.join(sorted(unknown))}")
    cands = []
    for batch in _batches(wl):
        pb = min(16, batch)
        if "none" in schedules:
            cands.append(Candidate("none", batch, prefill_batch=pb))
        if draft is None:
            continue
        for sched in [s for s in ("single", "dual") if s in schedules]:
            if sched == "dual" and 2 * batch > max(wl.requests, 2):
                continue
            for kv in _draft_kvs(wl):
                for wf in weight_fp8:
                    for k in range(1, K_MAX + 1):
                        cands.append(Candidate(sched, batch, k=k, kv=kv, draft_fp8=wf, prefill_batch=pb,
                                               self_layers=self_layers))
    placed, timed = {}, []
    for c in cands:
        key = (c.schedule, c.batch, c.kv, c.draft_fp8)
        if key not in placed:  # memory does not depend on k
            placed[key] = _place(target, draft, self_layers, c, hw, wl, cm)
        p = placed[key]
        if not p.fits:
            timed.append(replace(c, fits=False, why=p.why, gpu_bytes=p.gpu_bytes, host_bytes=p.host_bytes))
            continue
        t = _time(target, draft, replace(p, k=c.k), hw, wl, cm)  # may trade layers for slots or GPU rows
        timed.append(replace(t, gpu_bytes=_gpu_bytes(target, draft, self_layers, t, wl, cm)))
    ok = [c for c in timed if c.fits]
    if not ok:
        worst = min(timed, key=lambda c: (c.gpu_bytes, c.host_bytes))
        raise CapacityError(f"no placement fits this machine: {worst.why} (the smallest candidate, "
                            f"batch {worst.batch})")
    best = max(ok, key=lambda c: (round(c.tokens_per_s, 6), -c.k, c.schedule == "none"))
    return Choice(best, to_plan(best, target, hw, copy_chunk_mib(target, best, hw, wl, cm)), tuple(timed), hw)


# The smallest batch the planner runs in two micro-batches (plan.micro_batches): they were
# measured at 192 rows (96 a part: W4, sessions 22, 28 and 31); below 64 rows each part's
# launches and hand-offs weigh more against its attention, unmeasured.
MICRO_BATCH_MIN_ROWS = 64

# Whether the planner offers spare GPU memory as GPU rows (plan.gpu_kv_rows). Off until
# session 32: session 21's rows (H200, W4 at k 3: 2.247 s a pass against 1.954 without) ran
# through cuDNN's attention, which built a graph each pass (38.7 ms a call at a new key length
# against 0.62 without it, `scripts/profile_gpu_rows.py` on an H100; GPU_CUDNN_ATTENTION in
# models/attention.py). Without cuDNN, 64 GPU rows took w1-long from 1,501.5 to 1,779.8 tok/s,
# and W4's measured best (0 resident, 48 rows: 227.4 tok/s) is what this model now chooses
# (0 resident, 59 rows, 227.9 predicted; docs/benchmarks.md, "Session 32"; since session 34 53 rows
# and a third slot, 227.1: the rows leave CostModel.draft_rows_slack_bytes free, as bench's do).
PRICE_GPU_ROWS = True

# Weight copies go out in pieces; the copy engine runs host-to-device copies in the order they
# were queued, so a layer's attention output waits behind the pieces queued ahead of it. Where
# the layer chain, not the copy, bounds a layer, small pieces shorten that wait (W4-small at
# k 4: 8 MiB pieces took 0.488 and 0.604 s a pass on two machines against 0.509 and 0.727-0.798
# with 64 MiB; docs/benchmarks.md, session 19) for a slower copy (50 against 55 GB/s), which
# costs where the copy bounds the layer.
SMALL_COPY_CHUNK_MIB = 8


def copy_chunk_mib(target: ModelSpec, c: Candidate, hw: Hardware, wl: Workload, cm: CostModel) -> int:
    """The copy piece size for candidate c: small where its layers are bound by their chain."""
    k = c.k if c.schedule != "none" else 0
    chain = cmod.layer_chain_s(hw, cm, target, c.batch, k + 1, wl.prompt_len + wl.gen_len // 2, c.gpu_kv_rows,
                               c.micro_batches)
    return SMALL_COPY_CHUNK_MIB if chain > cmod.layer_copy_s(hw, target) else Plan.copy_chunk_mib


def _draft_kvs(wl: Workload) -> list[DraftKV]:
    """Every draft KV placement: whole on the GPU, windowed rings (bf16, fp8) that are shorter
    than the context, in host memory, recomputed."""
    rings = [DraftKV("gpu", w, SINKS, f) for w in WINDOWS if w < wl.context for f in (False, True)]
    return [DraftKV("gpu"), *rings, *(DraftKV(p) for p in PLACEMENTS if p != "gpu")]


def to_plan(c: Candidate, target: ModelSpec, hw: Hardware, chunk_mib: int | None = None) -> Plan:
    L = target.num_layers
    return Plan(device=hw.device, gpu_memory=hw.gpu_memory if hw.device == "cuda" else None,
                gpu_layers=resident_layers(L, c.resident, c.disk, c.self_layers),
                disk_layers=tuple(range(L - c.disk, L)), num_slots=c.slots,
                batch_size=c.batch, prefill_batch=c.prefill_batch, draft_fp8=c.draft_fp8, gpu_kv_rows=c.gpu_kv_rows,
                host_embedding=c.host_embedding,
                micro_batches=c.micro_batches, copy_chunk_mib=chunk_mib or Plan.copy_chunk_mib,
                attention_threads=max(1, hw.cpu_cores - 2) if hw.device == "cuda" else None
                ).with_draft_kv(c.kv if c.schedule != "none" else DraftKV())
