"""The planner's model of a run: bytes that must fit where, and seconds per stage.

Time of a streamed target pass, per layer: the weight copy and the layer's chain (GPU before
attention, the round trip to the CPU worker, CPU attention, GPU FFN) overlap, so a layer costs
the longer of the two; resident layers cost only their chain. A draft step reads the draft's
weights and does its arithmetic on the GPU. Rounds: every sequence of a batch must finish, so a
batch runs as many rounds as its slowest sequence needs; that is simulated (acceptance is a
per-token probability), not taken from the mean, since the tail is most of the gap between the
mean and what W1 measured.

The constants below are the parts the measured figures do not give.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ..models.spec import ModelSpec
from .draft_kv import DraftKV
from .hardware import Hardware

GiB = 1 << 30


@dataclass(frozen=True)
class CostModel:
    # Fitted to W1's traces and profiles; where each figure comes from: docs/benchmarks.md,
    # "The cost model's constants".
    # Per target layer and pass: GPU launches, q/k/v and output transfers and the hand-offs
    # between the executor and the CPU worker, which do not grow with tokens. 12.5 ms fitted to
    # W1's traces with Ray's hand-offs; the doorbells (plan.layer_doorbell, on by default) took
    # 5.9 ms off each layer of W4-small's verification pass (docs/benchmarks.md, session 18).
    layer_fixed_s: float = 0.0066
    # Share of the measured matmul rate that the target's FFN and the draft reach.
    gpu_efficiency: float = 0.6
    # Per draft step and layer: launches that CUDA graphs do not remove.
    draft_layer_fixed_s: float = 0.0001
    # Widening an fp8 ring to bf16 runs far below the memory bandwidth.
    fp8_widen_efficiency: float = 0.17
    # Per round: the draft's first, eager step over the accepted tokens.
    draft_round_fixed_s: float = 0.034
    # Per round, between the last layer's copy and the first draft step: that layer's chain,
    # the head, acceptance and the messages.
    round_tail_s: float = 0.11
    # Per draft layer and step with fp8 matrices: quantizing each matmul's input.
    fp8_matmul_layer_fixed_s: float = 0.00012
    # Device memory beside weights, caches and the CUDA context: allocator slack, CUDA graph
    # pools, the MoE chunks (a prefill's own activations: prefill_gpu_bytes).
    workspace_bytes: int = int(1.0 * GiB)
    # GPU memory a speculative run's GPU rows leave free when they fill the rest of the cap
    # (planner.gpu_kv_rows_fit): draft graph pools and passes whose shape changes with k leave
    # the allocator fragments the account does not see. On W1-long (H200 capped at 24 GiB, 3
    # resident layers) 107 rows, which the account filled to 23.99 GiB, ran out of memory in a
    # verification pass with 23.27 GiB allocated (session 30, call 2); 64 rows peaked at
    # 20.98 GiB (call 3). Plain decoding's rows peaked 1.7 GiB under the cap: no slack added.
    draft_rows_slack_bytes: int = int(0.75 * GiB)
    # Host memory kept free for Ray's object store, the processes and the OS.
    host_reserve_bytes: int = 8 * GiB
    # The CUDA context and cuBLAS handles of the executor's process, which a card's memory also
    # holds (the executor caps its allocator at gpu_memory minus what it measures at start;
    # 0.52 GiB on the H200 with torch 2.11).
    cuda_context_bytes: int = int(0.55 * GiB)


def dtype_bytes(spec: ModelSpec) -> int:
    return spec.torch_dtype.itemsize


def layer_bytes(spec: ModelSpec) -> int:
    """The largest layer as stored (fp8 targets: half the bytes; ModelSpec.layer_bytes)."""
    return spec.layer_bytes()


def active_layer_params(spec: ModelSpec) -> int:
    """Parameters one token multiplies per layer (a MoE token visits top-k experts)."""
    h, d = spec.hidden_size, spec.head_dim
    attn = h * d * (spec.num_heads * 2 + spec.num_kv_heads * 2)
    if not spec.is_moe:
        return attn + 3 * h * spec.intermediate_size
    return attn + 3 * h * (spec.expert_size * spec.experts_per_token + spec.shared_expert_size)


def glob_bytes(spec: ModelSpec) -> int:
    """Embedding, final norm and head (the head is the embedding when tied)."""
    n = spec.vocab_size * spec.hidden_size * (1 if spec.tie_embeddings else 2) + spec.hidden_size
    return n * dtype_bytes(spec)


def gpu_glob_bytes(spec: ModelSpec, host_embedding: bool) -> int:
    """The globals' GPU memory: all of them, or without an untied embedding table that stays
    in host memory (plan.host_embedding; a tied one is the head and stays)."""
    if host_embedding and not spec.tie_embeddings:
        return glob_bytes(spec) - spec.vocab_size * spec.hidden_size * dtype_bytes(spec)
    return glob_bytes(spec)


def model_bytes(spec: ModelSpec, fp8_layers: bool = False) -> int:
    """fp8_layers: the layers' matrices in fp8 (models/fp8_weights.py; the globals stay)."""
    return spec.num_layers * draft_layer_bytes(spec, fp8_layers) + glob_bytes(spec)


def draft_layer_bytes(spec: ModelSpec, fp8: bool) -> int:
    return spec.layer_param_count() * 1 if fp8 else spec.layer_bytes()


def prefill_gpu_bytes(spec: ModelSpec, prompts: int, sub_batch: int, prompt_len: int) -> int:
    """Device memory of a prefill beside the workspace: every prompt's hidden state and RoPE
    tables, kept from the first layer to the last (each layer serves all sub-batches before the
    next comes), plus, for a dense FFN, one sub-batch's gate/up output and their product (3 x
    its width a token). A MoE FFN runs in chunks the workspace holds. For W1 (192 prompts in
    sub-batches of 16) the kept states come to the 12 x hidden a sub-batch token that runs 11
    to 16 had fitted; W4's prefill (Llama-3.1-70B, FFN 3.5 x hidden) ran out of memory when
    the FFN was left out (docs/results/s16/README.md). It ran out again with it counted
    (docs/results/s17/README.md): the FFN's activations then took more than 3 x its width a
    token, so it now runs in chunks of rows (layers.DENSE_CHUNK_BYTES), sized so that a chunk's
    peak stays within this count of a whole sub-batch (layers.dense_chunk_rows)."""
    d = dtype_bytes(spec)
    kept = prompts * prompt_len * (spec.hidden_size + 2 * spec.head_dim) * d
    dense = (not spec.is_moe) or bool(spec.dense_layers)
    ffn = min(sub_batch, prompts) * prompt_len * 3 * spec.intermediate_size * d if dense else 0
    return kept + ffn


def kv_bytes_per_token_layer(spec: ModelSpec, fp8: bool = False) -> int:
    return 2 * spec.num_kv_heads * spec.head_dim * (1 if fp8 else dtype_bytes(spec))


# -- time --------------------------------------------------------------------------------------
def target_pass_s(hw: Hardware, cm: CostModel, spec: ModelSpec, batch: int, queries: int, context: int,
                  resident: int = 0, disk: int = 0, gpu_rows: int = 0, micro_batches: int = 1) -> float:
    """Seconds of one target pass: `batch` sequences, `queries` new tokens each (k + 1), over
    `context` cached tokens, with `resident` layers on the GPU, `disk` layers read from disk,
    the first `gpu_rows` sequences' KV on the GPU (plan.gpu_kv_rows), in `micro_batches` parts."""
    copy = layer_copy_s(hw, spec)
    copy_disk = layer_bytes(spec) / (min(hw.h2d_GBps, hw.disk_GBps) * 1e9)
    chain = layer_chain_s(hw, cm, spec, batch, queries, context, gpu_rows, micro_batches)
    streamed = spec.num_layers - resident - disk
    return resident * chain + streamed * max(copy, chain) + disk * max(copy_disk, chain)


def layer_chain_s(hw: Hardware, cm: CostModel, spec: ModelSpec, batch: int, queries: int, context: int,
                  gpu_rows: int = 0, micro_batches: int = 1) -> float:
    """One layer's chain: its fixed cost, the GPU's work, then CPU attention over the host KV
    of all but the first `gpu_rows` sequences, whose attention the GPU runs meanwhile.

    In m >= 2 micro-batches (plan.micro_batches) the worker attends for one part while the
    executor hands the others on (their FFN, the next q/k/v, the fixed cost), so a layer is the
    worker's whole attention or one part's attention plus the hand-off, whichever is longer.
    The hand-off takes the whole layer's GPU work, the executor running the parts' in turn.
    With W4's measured worker and GPU times per layer this gives 20.4 ms a layer against 20.6
    measured (H100, two parts, k 4, 48 GPU rows: worker 17.0 ms, GPU 5.3; session 31) and 19.5
    against 20.3 (H200, two parts, k 3: 18 and 3.9; session 22); one part then took 31.7 ms
    (session 22, k 5), where the worker's 26.7 ms could not overlap anything."""
    gpu = 2 * batch * queries * active_layer_params(spec) / (hw.device_tflops * 1e12 * cm.gpu_efficiency)
    cpu_rows = max(batch - gpu_rows, 0)
    kv = cpu_rows * context * kv_bytes_per_token_layer(spec)
    attn_flops = 4 * cpu_rows * queries * context * spec.num_heads * spec.head_dim
    cpu = kv / (hw.cpu_kv_GBps * 1e9) + attn_flops / (hw.cpu_attention_gflops * 1e9)
    on_gpu = min(gpu_rows, batch) * context * kv_bytes_per_token_layer(spec) / (hw.device_GBps * 1e9)
    attention = max(cpu, on_gpu)
    if micro_batches < 2:
        return cm.layer_fixed_s + gpu + attention
    return max(attention, attention / micro_batches + cm.layer_fixed_s + gpu)


def gpu_row_bytes(spec: ModelSpec, capacity: int) -> int:
    """Device memory of one sequence's target KV on the GPU (plan.gpu_kv_rows), every layer."""
    return spec.num_layers * capacity * kv_bytes_per_token_layer(spec)


def draft_step_s(hw: Hardware, cm: CostModel, spec: ModelSpec, batch: int, kv_tokens: int, fp8: bool,
                 fp8_weights: bool = False) -> float:
    """Seconds of one draft step (one token for each of `batch` sequences); fp8: its KV ring,
    fp8_weights: its layer matrices in fp8 (half the bytes read, plus the input quantization)."""
    weights = spec.num_layers * draft_layer_bytes(spec, fp8_weights) + glob_bytes(spec) // 2
    kv = batch * kv_tokens * kv_bytes_per_token_layer(spec, fp8) * spec.num_layers
    t = (weights + kv) / (hw.device_GBps * 1e9)
    t += 2 * batch * (spec.num_layers * active_layer_params(spec) + spec.vocab_size * spec.hidden_size) / (
        hw.device_tflops * 1e12 * cm.gpu_efficiency)
    if fp8:  # read fp8, write and read bf16
        t += 3 * kv / (hw.device_GBps * 1e9 * cm.fp8_widen_efficiency)
    if fp8_weights:
        t += spec.num_layers * cm.fp8_matmul_layer_fixed_s
    return t + spec.num_layers * cm.draft_layer_fixed_s


def draft_kv_round_s(hw: Hardware, cm: CostModel, spec: ModelSpec, kv: DraftKV, batch: int, kv_tokens: int) -> float:
    """What a draft KV kept off the device adds to a round: host memory's copies in and out,
    or a re-prefill of every sequence."""
    if kv.in_host_memory:
        return 2 * batch * kv.bytes_per_token(spec) * kv_tokens / (hw.h2d_GBps * 1e9)
    if kv.rebuilt:
        return prefill_s(hw, cm, spec, batch, kv_tokens, streamed=False)
    return 0.0


def layer_copy_s(hw: Hardware, spec: ModelSpec) -> float:
    return layer_bytes(spec) / (hw.h2d_GBps * 1e9)


def exposed_draft_s(cm: CostModel, t_draft: float, slots: int, copy_s: float) -> float:
    """Drafting that the weight copy does not hide: while the draft runs, the copy engine fills
    the slots with the next pass's first layers, then waits."""
    return max(0.0, t_draft + cm.round_tail_s - slots * copy_s)


def prefill_s(hw: Hardware, cm: CostModel, spec: ModelSpec, batch: int, prompt: int, streamed: bool) -> float:
    """Seconds to prefill `batch` prompts: each layer's weights once for all, compute-bound."""
    lb = layer_bytes(spec)
    flops = 2 * batch * prompt * active_layer_params(spec)
    gpu = flops / (hw.device_tflops * 1e12 * cm.gpu_efficiency)
    back = batch * prompt * kv_bytes_per_token_layer(spec) / (hw.h2d_GBps * 1e9)  # K/V to host
    per_layer = max(lb / (hw.h2d_GBps * 1e9), gpu + back) if streamed else gpu
    return spec.num_layers * per_layer


@functools.lru_cache(maxsize=4096)
def rounds_needed(alpha: float, k: int, batch: int, tokens: int, trials: int = 8, seed: int = 0) -> float:
    """Mean over trials of the rounds the slowest of `batch` sequences needs to emit `tokens`,
    when each draft token is accepted with probability alpha independently and a round adds the
    accepted prefix plus one target token (k = 0: one token per round)."""
    if tokens <= 0:
        return 0.0
    if k == 0 or alpha <= 0:
        return float(tokens)
    rng = np.random.default_rng(seed)
    rmax = tokens  # a round adds at least one token
    out = []
    for _ in range(trials):
        # accepted draft tokens per round: geometric failures before the first rejection, capped at k
        acc = np.minimum(rng.geometric(1 - alpha, size=(batch, rmax)) - 1, k) if alpha < 1 else np.full(
            (batch, rmax), k)
        done = np.cumsum(acc + 1, axis=1) >= tokens
        out.append(int(done.argmax(axis=1).max()) + 1)
    return float(np.mean(out))
