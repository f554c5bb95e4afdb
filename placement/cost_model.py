"""The planner's model of a run: bytes that must fit where, and seconds per stage.

Time of a streamed target pass, per layer: the weight copy and the layer's chain (GPU before
attention, the round trip to the CPU worker, CPU attention, GPU FFN) overlap, so a layer costs
the longer of the two; resident layers cost only their chain. A draft step reads the draft's
weights and does its arithmetic on the GPU. Rounds: every sequence of a batch must finish, so a
batch runs as many rounds as its slowest sequence needs; that is simulated (acceptance is a
per-token probability), not taken from the mean, since the tail is most of the gap between the
mean and what W1 measured.

The constants below are the parts the measured figures do not give; each names its source.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ..models.spec import ModelSpec
from .hardware import Hardware

GiB = 1 << 30


@dataclass(frozen=True)
class CostModel:
    # Per target layer and pass: GPU launches, the q/k/v and output transfers and Ray's
    # messages, independent of tokens (W1 run 11 traces, `none`: 0.1 + 3.0 + 1.9 ms of gaps and
    # qkv, 7.5 ms FFN for 192 tokens that is launch- and routing-bound).
    layer_fixed_s: float = 0.0125
    # Share of the measured matmul rate that the target's FFN and the draft reach (W1 run 11:
    # 2304-token verification FFN 10.4 ms against 7.5 ms at 192 tokens).
    gpu_efficiency: float = 0.6
    # Per draft step and layer: launches that CUDA graphs do not remove (session 4: 12.0 ms per
    # step for 192 sequences, bf16 ring, against ~9 ms of bytes and arithmetic).
    draft_layer_fixed_s: float = 0.0001
    # Widening an fp8 ring to bf16 runs far below the memory bandwidth (session 4's kernel
    # table: 89 us per K or V tensor per layer, 18.3 against 12.0 ms per step).
    fp8_widen_efficiency: float = 0.17
    # Per round: the draft's first, eager step over the accepted tokens (W1 traces, ~34 ms).
    draft_round_fixed_s: float = 0.034
    # Per round, between the last layer's copy and the first draft step: that layer's chain,
    # the head, acceptance and the messages (W1: round = copy + drafting + this - what the slots
    # prefetch meanwhile; run 11, 2 slots: 1.943 = 1.712 + 0.231 + 0.107 - 0.107; run 16, 4
    # slots: 1.780 = 1.712 + 0.168 + 0.114 - 0.214).
    round_tail_s: float = 0.11
    # Per draft layer and step with fp8 matrices: quantizing each matmul's input (H200,
    # profile_draft at batch 192: fp8 steps took 1.8-2.0 ms longer than bf16 ones although
    # they read 7 GB less).
    fp8_matmul_layer_fixed_s: float = 0.00012
    # Device memory beside weights, caches and the CUDA context: allocator slack, CUDA graph
    # pools, the MoE chunks (W1's fp8-draft placement peaked at 21.79 GiB allocated; with this
    # and the context the account is 22.56 GiB, docs/benchmarks.md "GPU memory account").
    workspace_bytes: int = int(1.0 * GiB)
    prefill_bytes_per_token_hidden: int = 12  # x hidden x dtype bytes, per prefill token
    # Host memory kept free for Ray's object store, the processes and the OS.
    host_reserve_bytes: int = 8 * GiB
    # The CUDA context and cuBLAS handles of the executor's process, which a card's memory also
    # holds (the executor caps its allocator at gpu_memory minus what it measures at start;
    # 0.52 GiB on the H200 with torch 2.11).
    cuda_context_bytes: int = int(0.55 * GiB)


def dtype_bytes(spec: ModelSpec) -> int:
    return spec.torch_dtype.itemsize


def layer_bytes(spec: ModelSpec) -> int:
    return spec.layer_param_count() * dtype_bytes(spec)


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


def model_bytes(spec: ModelSpec, fp8_layers: bool = False) -> int:
    """fp8_layers: the layers' matrices in fp8 (models/fp8_weights.py; the globals stay)."""
    return spec.num_layers * draft_layer_bytes(spec, fp8_layers) + glob_bytes(spec)


def draft_layer_bytes(spec: ModelSpec, fp8: bool) -> int:
    return spec.layer_param_count() * (1 if fp8 else dtype_bytes(spec))


def kv_bytes_per_token_layer(spec: ModelSpec, fp8: bool = False) -> int:
    return 2 * spec.num_kv_heads * spec.head_dim * (1 if fp8 else dtype_bytes(spec))


def draft_kv_tokens(window: int | None, sinks: int, context: int, k_max: int) -> int:
    """Tokens of draft KV kept per sequence: a ring of W + sinks (+ a pass's new tokens), or all."""
    return context if window is None else min(context, window + sinks + k_max)


# -- time --------------------------------------------------------------------------------------
def target_pass_s(hw: Hardware, cm: CostModel, spec: ModelSpec, batch: int, queries: int, context: int,
                  resident: int = 0, disk: int = 0) -> float:
    """Seconds of one target pass: `batch` sequences, `queries` new tokens each (k + 1), over
    `context` cached tokens, with `resident` layers on the GPU and `disk` layers read from disk."""
    lb = layer_bytes(spec)
    copy = lb / (hw.h2d_GBps * 1e9)
    copy_disk = lb / (min(hw.h2d_GBps, hw.disk_GBps) * 1e9)
    tokens = batch * queries
    gpu = 2 * tokens * active_layer_params(spec) / (hw.device_tflops * 1e12 * cm.gpu_efficiency)
    kv = batch * context * kv_bytes_per_token_layer(spec)
    attn_flops = 4 * batch * queries * context * spec.num_heads * spec.head_dim
    cpu = kv / (hw.cpu_kv_GBps * 1e9) + attn_flops / (hw.cpu_attention_gflops * 1e9)
    chain = cm.layer_fixed_s + gpu + cpu
    streamed = spec.num_layers - resident - disk
    return resident * chain + streamed * max(copy, chain) + disk * max(copy_disk, chain)


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
