"""The architecture facts the engine needs, read from a Hugging Face config.

One frozen dataclass for every supported family, so the layer math never looks at
family-specific config attributes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError

# model_type -> family traits that the config alone does not say.
_FAMILIES = {
    "llama": dict(qkv_bias=None, qk_norm=False),
    "mistral": dict(qkv_bias=None, qk_norm=False),
    "mixtral": dict(qkv_bias=None, qk_norm=False),
    "qwen2": dict(qkv_bias=True, qk_norm=False),
    "qwen3": dict(qkv_bias=None, qk_norm=True),
    "qwen2_moe": dict(qkv_bias="qkv_bias", qk_norm=False),  # the config's own qkv_bias flag
    "qwen3_moe": dict(qkv_bias=None, qk_norm=True),
}
SUPPORTED = tuple(sorted(_FAMILIES))


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    max_positions: int
    tie_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    num_experts: int = 0  # 0 = dense FFN
    experts_per_token: int = 0
    hidden_act: str = "silu"
    # Per layer: None for full attention, else the window (keys kept = window).
    sliding_windows: tuple = field(default=())
    dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple = ()
    # Qwen MoE: experts narrower than the dense FFN (0: intermediate_size, as Mixtral), top-k
    # weights renormalised or not, a shared expert behind a sigmoid gate (0: none), and the
    # layers that keep a dense FFN (mlp_only_layers / decoder_sparse_step).
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    shared_expert_size: int = 0
    dense_layers: tuple = ()
    # Scaled RoPE: the config facts transformers' rope initialisation reads, as JSON
    # (models/rope.py); "" is plain RoPE from rope_theta.
    rope: str = ""
    # "fp8": the layers' matrices are stored in fp8 e4m3 with fp32 scales (an fp8 checkpoint or
    # --quantize fp8; models/fp8_weights.py); norms, router, embeddings and head stay in `dtype`.
    weights: str = ""

    def __post_init__(self):
        if self.weights not in ("", "fp8"):
            raise CheckpointError(f"unsupported weight storage {self.weights!r}; supported: fp8")
        if self.model_type not in _FAMILIES:
            raise CheckpointError(
                f"unsupported architecture {self.model_type!r}; supported: {', '.join(SUPPORTED)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                f"num_attention_heads {self.num_heads} is not a multiple of "
                f"num_key_value_heads {self.num_kv_heads}"
            )
        if self.hidden_act not in ("silu", "gelu", "gelu_pytorch_tanh"):
            raise CheckpointError(f"unsupported hidden_act {self.hidden_act!r}")
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (None,) * self.num_layers)
        if len(self.sliding_windows) != self.num_layers:
            raise CheckpointError("sliding_windows must have one entry per layer")
        if self.num_experts and not 0 < self.experts_per_token <= self.num_experts:
            raise CheckpointError(
                f"num_experts_per_tok {self.experts_per_token} out of range for "
                f"{self.num_experts} experts"
            )

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def expert_size(self) -> int:
        """Width of one routed expert's FFN."""
        return self.moe_intermediate_size or self.intermediate_size

    def layer_is_moe(self, j: int) -> bool:
        return self.is_moe and j not in self.dense_layers

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K plus V per token over all layers, in the model dtype."""
        itemsize = torch.empty((), dtype=self.torch_dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

    def layer_param_count(self, j: int | None = None) -> int:
        """Parameters of layer j; without j, of the largest layer (an MoE one where there are
        any: the planner sizes weight slots by it)."""
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        if not (self.layer_is_moe(j) if j is not None else self.is_moe):
            return attn + 3 * h * self.intermediate_size + 2 * h
        ffn = 3 * h * self.expert_size * self.num_experts
        shared = 3 * h * self.shared_expert_size + h if self.shared_expert_size else 0
        router = h * self.num_experts
        return attn + ffn + shared + router + 2 * h

    def layer_bytes(self, j: int | None = None) -> int:
        """Bytes of layer j (without j, of the largest) as stored: in fp8, a byte per matrix
        element, an fp32 scale per output row (an upper bound for block scales), the rest in dtype."""
        n, item = self.layer_param_count(j), self.torch_dtype.itemsize
        if self.weights != "fp8":
            return n * item
        h, d = self.hidden_size, self.head_dim
        moe = self.layer_is_moe(j) if j is not None else self.is_moe
        small = 2 * h + (h * self.num_experts + (h if self.shared_expert_size else 0) if moe else 0)
        rows = (self.num_heads + 2 * self.num_kv_heads) * d + h
        if moe:
            rows += self.num_experts * (2 * self.expert_size + h) + (2 * self.shared_expert_size + h if self.shared_expert_size else 0)
        else:
            rows += 2 * self.intermediate_size + h
        return (n - small) + small * item + 4 * rows

    def with_layers(self, n: int) -> "ModelSpec":
        """The same architecture truncated to its first n layers (self-speculative drafts)."""
        from dataclasses import replace

        return replace(self, num_layers=n, sliding_windows=self.sliding_windows[:n])

    @classmethod
    def from_hf_config(cls, cfg, dtype: str | None = None) -> "ModelSpec":
        mt = getattr(cfg, "model_type", None)
        if mt not in _FAMILIES:
            raise CheckpointError(
                f"unsupported architecture {mt!r}; supported: {', '.join(SUPPORTED)}"
            )
        fam = _FAMILIES[mt]
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        rope = getattr(cfg, "rope_parameters", None) or {}
        from .rope import describe_rope

        rope_desc, max_positions = describe_rope(cfg, head_dim)
        theta = rope.get("rope_theta") or getattr(cfg, "rope_theta", None) or 10000.0
        n = cfg.num_hidden_layers
        windows = _sliding_windows(cfg, mt, n)
        if isinstance(fam["qkv_bias"], str):
            qkv_bias = bool(getattr(cfg, fam["qkv_bias"], True))
        elif fam["qkv_bias"] is not None:
            qkv_bias = fam["qkv_bias"]
        else:
            qkv_bias = bool(getattr(cfg, "attention_bias", False))
        # Mixtral calls it num_local_experts, the Qwen MoE configs num_experts.
        experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None) or 0
        moe = _moe_fields(cfg, mt, n) if experts else {}
        eos = getattr(cfg, "eos_token_id", None)
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        if dtype is None:
            dtype = str(getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or "float32")
            dtype = dtype.replace("torch.", "")
        return cls(
            model_type=mt,
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=n,
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=head_dim,
            rms_eps=cfg.rms_norm_eps,
            rope_theta=float(theta),
            max_positions=max_positions,
            tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            qk_norm=fam["qk_norm"],
            num_experts=experts,
            experts_per_token=(getattr(cfg, "num_experts_per_tok", 0) or 0) if experts else 0,
            hidden_act=getattr(cfg, "hidden_act", "silu"),
            sliding_windows=windows,
            dtype=dtype,
            bos_token_id=getattr(cfg, "bos_token_id", None),
            eos_token_ids=eos,
            rope=rope_desc,
            **moe,
        )


def _moe_fields(cfg, model_type: str, n: int) -> dict:
    if not model_type.endswith("_moe"):
        return {}  # Mixtral: every layer routed, experts as wide as intermediate_size, top-k renormalised
    # The rule of transformers' Qwen2Moe/Qwen3MoeDecoderLayer for which layers are sparse.
    step = getattr(cfg, "decoder_sparse_step", 1) or 1
    only = set(getattr(cfg, "mlp_only_layers", None) or ())
    return dict(
        moe_intermediate_size=cfg.moe_intermediate_size,
        norm_topk_prob=bool(getattr(cfg, "norm_topk_prob", False)),
        shared_expert_size=(getattr(cfg, "shared_expert_intermediate_size", 0) or 0) if model_type == "qwen2_moe" else 0,
        dense_layers=tuple(j for j in range(n) if j in only or (j + 1) % step),
    )


def _sliding_windows(cfg, model_type: str, n: int) -> tuple:
    window = getattr(cfg, "sliding_window", None)
    if model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        types = getattr(cfg, "layer_types", None)
        if not getattr(cfg, "use_sliding_window", False) or not window:
            return (None,) * n
        if types:
            return tuple(window if t == "sliding_attention" else None for t in types)
        lim = getattr(cfg, "max_window_layers", n)
        return tuple(window if i >= lim else None for i in range(n))
    return (window,) * n if window else (None,) * n


def load_spec(model_dir: str | Path, dtype: str | None = None) -> ModelSpec:
    """Read config.json through transformers' AutoConfig, with a clear error per failure."""
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"model folder not found: {model_dir}")
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"no config.json in {model_dir}")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if raw.get("model_type") not in _FAMILIES:
        raise CheckpointError(
            f"{cfg_path}: unsupported architecture {raw.get('model_type')!r}; "
            f"supported: {', '.join(SUPPORTED)}"
        )
    try:
        cfg = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # transformers raises many kinds; the message is what matters
        raise CheckpointError(f"{cfg_path}: {str(e).splitlines()[0]}") from None
    spec = ModelSpec.from_hf_config(cfg, dtype=dtype)
    from .fp8_checkpoint import Fp8Format

    if Fp8Format.of(cfg_path, raw.get("quantization_config")) is not None:
        from dataclasses import replace

        spec = replace(spec, weights="fp8")
    return spec
