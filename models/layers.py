"""Decoder layer math, split the way offloading needs it.

A layer is `pre_attention` (norm, q/k/v projections, RoPE) -> attention (a function of q and
a KV cache, see `attention.py`; it may run in another process) -> `post_attention` (output
projection, residual, norm, dense or MoE FFN, residual). Tokens are packed: `h` is
[T, hidden] for the new tokens of all sequences together, so ragged batches waste nothing.

Weights of one layer are a flat dict with the names in `LAYER_KEYS`; experts are stacked
into [E, ...] tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fp8_weights import Fp8Weight, SharedInput, gathered
from .host_io import to_host
from .rope import rope_table
from .spec import ModelSpec

# Names of one layer's tensors in our flat layout (see checkpoint.py for the HF mapping).
ATTN_KEYS = ("ln1", "q", "k", "v", "q_bias", "k_bias", "v_bias", "q_norm", "k_norm")
FFN_KEYS = ("o", "ln2", "gate", "up", "down", "router", "w_gate", "w_up", "w_down",
            "s_gate", "s_up", "s_down", "shared_gate")  # s_*: Qwen2-MoE's shared expert
LAYER_KEYS = ATTN_KEYS + FFN_KEYS
OUT_KEYS = ("o", "down", "w_down", "s_down")  # the matrices that write into the residual stream


def layer_shapes(spec: ModelSpec, j: int) -> dict[str, tuple]:
    """The tensors layer j of `spec` has in the flat layout, name -> shape (the names a
    checkpoint must fill; random and constructed weights make them). Norm weights are the
    names starting with "ln" or ending in "_norm", biases end in "_bias"."""
    h, d, inter = spec.hidden_size, spec.head_dim, spec.intermediate_size
    q, kv = spec.num_heads * d, spec.num_kv_heads * d
    shapes = {"ln1": (h,), "ln2": (h,), "q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q)}
    if spec.qkv_bias:
        shapes |= {"q_bias": (q,), "k_bias": (kv,), "v_bias": (kv,)}
    if spec.qk_norm:
        shapes |= {"q_norm": (d,), "k_norm": (d,)}
    if spec.layer_is_moe(j):
        e, x = spec.num_experts, spec.expert_size  # Qwen MoE experts are narrower than its dense FFN
        shapes |= {"router": (e, h), "w_gate": (e, x, h), "w_up": (e, x, h), "w_down": (e, h, x)}
        if spec.shared_expert_size:  # Qwen2-MoE's shared expert and its gate
            s = spec.shared_expert_size
            shapes |= {"s_gate": (s, h), "s_up": (s, h), "s_down": (h, s), "shared_gate": (1, h)}
    else:
        shapes |= {"gate": (inter, h), "up": (inter, h), "down": (h, inter)}
    return shapes


def is_norm(name: str) -> bool:
    return name.startswith("ln") or name.endswith("_norm")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same op order as transformers' RMSNorm: statistics in fp32, scale in the input dtype.
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def rope_cos_sin(spec: ModelSpec, positions: torch.Tensor, dtype, seq_lens: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, head_dim] for packed token positions; computed once per forward pass.
    `seq_lens`: per token, the sequence length transformers' dynamic/longrope RoPE would use
    (models/rope.py; default position + 1, a decode or verification token)."""
    return rope_table(spec, positions.device).cos_sin(positions, dtype, seq_lens)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [T, heads, d]; cos/sin [T, d]
    return x * cos[:, None, :] + _rotate_half(x) * sin[:, None, :]


def _linear(x, w, b=None, shared: SharedInput | None = None):
    """shared: x's quantization, for fp8 matrices that read the same x (SharedInput)."""
    if isinstance(w, Fp8Weight):  # an fp8 matrix, the draft's or the target's (models/fp8_weights.py)
        return w.linear(x, b, shared)
    return F.linear(x, w, b)


def pre_attention(spec: ModelSpec, w: dict, h: torch.Tensor, cos, sin, fused=None):
    """h [T, H] -> q [T, Hq, d], k [T, Hkv, d], v [T, Hkv, d] (RoPE applied). fused:
    models.fused.Fused, the elementwise work in fewer kernels, the same values (plan.fused_prefill)."""
    w = gathered(w)  # fp8 matrices as they sit in a weight slot: values and scales apart
    T, d = h.shape[0], spec.head_dim
    if "qkv" in w:  # an fp8 draft's stacked q/k/v (models/fp8_weights.py)
        x = rms_norm(h, w["ln1"], spec.rms_eps)
        q, k, v = _linear(x, w["qkv"]).split([spec.num_heads * d, spec.num_kv_heads * d, spec.num_kv_heads * d], -1)
        if "q_bias" in w:
            q, k, v = q + w["q_bias"], k + w["k_bias"], v + w["v_bias"]
    else:
        if fused is None:
            x, shared = rms_norm(h, w["ln1"], spec.rms_eps), SharedInput()
        else:
            x, shared = fused.norm_input(h, w["ln1"], spec.rms_eps, [w["q"], w["k"], w["v"]])
        q, k, v = (_linear(x, w[n], w.get(f"{n}_bias"), shared) for n in ("q", "k", "v"))
    q, k, v = q.view(T, spec.num_heads, d), k.view(T, spec.num_kv_heads, d), v.view(T, spec.num_kv_heads, d)
    if spec.qk_norm:
        q = rms_norm(q, w["q_norm"], spec.rms_eps)
        k = rms_norm(k, w["k_norm"], spec.rms_eps)
    if fused is not None:
        return (*fused.rope(q, k, cos, sin), v)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def activation(name: str, x):
    """The FFN's activation by its config name (spec.hidden_act)."""
    if name == "silu":
        return F.silu(x)
    return F.gelu(x, approximate="tanh" if name == "gelu_pytorch_tanh" else "none")


def _act(spec: ModelSpec, x):
    return activation(spec.hidden_act, x)


# Bytes of one dense FFN intermediate ([tokens, I]) made at once. A prefill sub-batch of
# Llama-3.1-70B (16 x 512 tokens, I = 28672) in one go makes 896 MiB of gate/up output, 448
# MiB for each of the activation and the product, and 224 MiB for the product's fp8 copy, 4.5x
# the intermediate: W4 ran out of GPU memory there under its 24 GiB cap (docs/results/s17).
# So rows go in chunks: at least DENSE_CHUNK_BYTES of intermediate, and up to
# DENSE_CHUNK_MAX_BYTES while a chunk is at most 2/3 of the whole, so that its 4.5x stays in
# the 3x the planner's prefill account counts (cost_model.prefill_gpu_bytes). Larger chunks
# run faster: one W4 prefill layer took 18.82 ms at 256 MiB against 20.65 at 64, 549 MiB more
# at its peak (docs/benchmarks.md, session 21). Decode and verification tokens (batch x (k + 1))
# fit one chunk; rows are independent, so chunks change no result's rows.
DENSE_CHUNK_BYTES = 64 << 20
DENSE_CHUNK_MAX_BYTES = 256 << 20


def dense_chunk_rows(tokens: int, width: int, elsize: int) -> int:
    """Rows of a dense FFN's input made at once (see DENSE_CHUNK_BYTES)."""
    row = width * elsize
    want = min(DENSE_CHUNK_MAX_BYTES, max(DENSE_CHUNK_BYTES, 2 * tokens * row // 3))
    return max(1, want // row)


def dense_ffn(spec: ModelSpec, w: dict, x: torch.Tensor, shared: SharedInput | None = None,
              fused=None) -> torch.Tensor:
    """shared: x quantized for gate/up already (models/fused.py); fused: as pre_attention's."""
    step = dense_chunk_rows(x.shape[0], w["down"].shape[1], x.element_size())
    if x.shape[0] <= step:
        return _dense_ffn(spec, w, x, shared, fused)
    out = x.new_empty(x.shape[0], w["down"].shape[0])
    for lo in range(0, x.shape[0], step):
        part = None if shared is None else shared.rows(lo, lo + step)
        out[lo: lo + step] = _dense_ffn(spec, w, x[lo: lo + step], part, fused)
    return out


def _dense_ffn(spec: ModelSpec, w: dict, x: torch.Tensor, shared: SharedInput | None = None,
               fused=None) -> torch.Tensor:
    if "gate_up" in w:  # an fp8 draft's stacked gate/up
        g, u = _linear(x, w["gate_up"]).chunk(2, dim=-1)
        return _linear(_act(spec, g) * u, w["down"])
    shared = shared or SharedInput()
    if fused is not None:
        m, m_shared = fused.act_mul_input(spec.hidden_act, _linear(x, w["gate"], shared=shared),
                                          _linear(x, w["up"], shared=shared), w["down"])
        return _linear(m, w["down"], shared=m_shared)
    return _linear(_act(spec, _linear(x, w["gate"], shared=shared)) * _linear(x, w["up"], shared=shared), w["down"])


def moe_ffn(spec: ModelSpec, w: dict, x: torch.Tensor, grouped: bool | None = None) -> torch.Tensor:
    """Top-k routed experts: softmax over experts, top-k, renormalised (Mixtral; Qwen MoE where
    norm_topk_prob), plus Qwen2-MoE's shared expert scaled by its sigmoid gate.

    Token-expert pairs are sorted by expert; with `torch._grouped_mm` (torch >= 2.8) each of
    the three projections is one grouped matmul over all experts (per chunk of pairs, see
    MOE_CHUNK_BYTES), its group boundaries left on the device. The loop over experts
    (`grouped=False`, and where grouped matmuls are missing) reads the per-expert counts on
    the host: a device wait in the middle of every MoE layer, then one launch chain per
    expert. Both add each token's experts in expert order.
    """
    logits = _linear(x, w["router"])
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    top_w, top_i = torch.topk(probs, spec.experts_per_token, dim=-1)
    if spec.norm_topk_prob:
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    top_w = top_w.to(x.dtype)
    flat_e = top_i.reshape(-1)
    order = torch.argsort(flat_e, stable=True)
    tok = order // spec.experts_per_token  # the token of each pair, pairs in expert order
    weight = top_w.reshape(-1)[order, None]
    counts = torch.bincount(flat_e, minlength=spec.num_experts)
    if grouped is None:
        grouped = _grouped_mm_works(x)
    out = None
    if grouped:
        try:
            out = _experts_grouped(spec, w, x, tok, weight, counts)
        except torch.OutOfMemoryError:
            raise  # not a refusal: the loop would need the memory too
        except (RuntimeError, NotImplementedError, AttributeError):  # shapes, dtypes or kernels this build refuses
            _GROUPED_MM_FAILED.add((x.device.type, x.dtype))
    if out is None:
        out = _experts_loop(spec, w, x, tok, weight, counts)
    if "shared_gate" in w:  # transformers' order: routed experts + sigmoid(gate) * shared expert
        xs = SharedInput()
        shared = _linear(_act(spec, _linear(x, w["s_gate"], shared=xs)) * _linear(x, w["s_up"], shared=xs), w["s_down"])
        out = out + torch.sigmoid(_linear(x, w["shared_gate"])) * shared
    return out


# (device type, dtype) where a grouped matmul raised once: the loop serves them from then on.
_GROUPED_MM_FAILED: set = set()


def _grouped_mm_works(x: torch.Tensor) -> bool:
    return hasattr(torch, "_grouped_mm") and (x.device.type, x.dtype) not in _GROUPED_MM_FAILED


# Bytes of one expert intermediate ([pairs, I]) that a grouped matmul makes at once. All of a
# prefill sub-batch in one go (16 x 512 tokens, top-2, Mixtral's 14336-wide experts) needs
# ~1.3 GiB of them, more than W1's 24 GiB cap leaves; the loop
# peaks at one expert's rows. Chunks are ranges of the expert-sorted pairs, so their group
# boundaries come from the same device-side counts, and tokens still add experts in order.
MOE_CHUNK_BYTES = 64 << 20


def _experts_grouped(spec, w, x, tok, weight, counts):
    ends = torch.cumsum(counts, 0)  # end of each expert's rows among the sorted pairs
    out = torch.zeros_like(x)
    pairs = tok.shape[0]
    step = max(1, MOE_CHUNK_BYTES // (w["w_gate"].shape[1] * x.element_size()))

    # fp8 experts with static input scales need each row's expert to scale it
    static = any(isinstance(w[n], Fp8Weight) and w[n].input_scale is not None for n in ("w_gate", "w_up", "w_down"))
    expert_of_pair = torch.repeat_interleave(torch.arange(len(counts), device=x.device), counts) if static else None

    def mm(m, name, offs, a, b):  # weights are stacked [E, out, in]: each group multiplies by W^T
        if isinstance(w[name], Fp8Weight):
            return w[name].grouped(m, offs, None if expert_of_pair is None else expert_of_pair[a:b])
        return torch._grouped_mm(m, w[name].transpose(-2, -1), offs=offs)

    for a in range(0, pairs, step):
        b = min(a + step, pairs)
        offs = (ends.clamp(a, b) - a).to(torch.int32)
        t = tok[a:b]
        xs = x[t]
        y = mm(_act(spec, mm(xs, "w_gate", offs, a, b)) * mm(xs, "w_up", offs, a, b), "w_down", offs, a, b)
        out.index_add_(0, t, y * weight[a:b])
    return out


def _experts_loop(spec, w, x, tok, weight, counts):
    out = torch.zeros_like(x)
    start = 0
    for e, n in enumerate(to_host(counts)[0].tolist()):
        if n == 0:
            continue
        t = tok[start: start + n]
        xe = x[t]
        ye = _linear(_act(spec, _linear(xe, w["w_gate"][e])) * _linear(xe, w["w_up"][e]), w["w_down"][e])
        out.index_add_(0, t, ye * weight[start: start + n])
        start += n
    return out


def post_attention(spec: ModelSpec, w: dict, h: torch.Tensor, attn: torch.Tensor, fused=None) -> torch.Tensor:
    """h [T, H] residual stream, attn [T, Hq*d] attention output -> next layer's h. fused: as
    pre_attention's (dense layers; an MoE layer's routing runs as it does without)."""
    w = gathered(w)
    # Per layer, from its weights: Qwen MoE models mix dense layers in (mlp_only_layers).
    if fused is not None and "router" not in w and "gate_up" not in w:
        h, x, shared = fused.add_norm_input(h, _linear(attn, w["o"]), w["ln2"], spec.rms_eps, [w["gate"], w["up"]])
        return h + dense_ffn(spec, w, x, shared, fused)
    h = h + _linear(attn, w["o"])
    x = rms_norm(h, w["ln2"], spec.rms_eps)
    return h + (moe_ffn(spec, w, x) if "router" in w else dense_ffn(spec, w, x))


def embed(w_embed: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[T, H] rows of the table for `tokens`, on the tokens' device. A table in host memory
    beside tokens on the GPU (plan.host_embedding) is read on the host, and only the T rows
    cross: reading the tokens waits for the device's work that made them."""
    if w_embed.device == tokens.device:
        return F.embedding(tokens, w_embed)
    return F.embedding(tokens.to(w_embed.device), w_embed).to(tokens.device)


def head(spec: ModelSpec, w_norm: torch.Tensor, w_head: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Final norm and LM head -> fp32 logits [T, V]."""
    return _linear(rms_norm(h, w_norm, spec.rms_eps), w_head).float()
