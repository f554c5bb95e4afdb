"""RoPE of every kind the supported families ship: default, linear, dynamic, yarn, longrope, llama3.

The inverse frequencies and the attention scaling come from transformers' own rope
initialisation (`modeling_rope_utils.ROPE_INIT_FUNCTIONS`), called on the checkpoint's rope
parameters, so a scaled checkpoint rotates exactly as under transformers.

Two kinds change with the sequence length. transformers (`dynamic_rope_update`) picks the
frequencies of a forward pass from its longest position: `seq_len = max(position_ids) + 1`.
`longrope` switches from the short to the long factors once seq_len passes
original_max_position_embeddings; `dynamic` recomputes its base for any seq_len past
max_position_embeddings. Under transformers' generate a prompt is one pass (seq_len = its
length) and each later token its own pass (seq_len = its position + 1), and the keys already
cached keep the rotation they were made with. The engine reproduces that per token: a token of
a prefill (a pass that starts at position 0) uses its prompt's length, any later token its own
position + 1. This makes a token's rotation independent of batching and of how many draft
tokens a verification pass carries, which speculation needs: the target must score a verified
token exactly as it would have scored it decoding one token at a time.
"""

from __future__ import annotations

import functools
import json

import torch

from ..errors import CheckpointError

STATIC = ("default", "linear", "yarn", "llama3")  # one set of frequencies at any length
SUPPORTED_ROPE = STATIC + ("dynamic", "longrope")


def describe_rope(cfg, head_dim: int) -> tuple[str, int]:
    """(what ModelSpec.rope keeps, the context the model may be run to) for a transformers config."""
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    max_pos = int(getattr(cfg, "max_position_embeddings", 4096))
    if params and all(isinstance(v, dict) for v in params.values()):
        raise CheckpointError("per-layer-type rope parameters are not supported")
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in SUPPORTED_ROPE:
        raise CheckpointError(f"unsupported rope_type {kind!r}; supported: {', '.join(SUPPORTED_ROPE)}")
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError("partial rotary embeddings (partial_rotary_factor < 1) are not supported")
    if kind == "default":
        return "", max_pos  # plain RoPE from rope_theta: the engine's own few lines
    # The context a scaled model may run to, as vLLM derives it: linear and dynamic stretch
    # max_position_embeddings (the trained context) by `factor`, yarn the original context
    # (checkpoints often leave max_position_embeddings at the trained length); llama3 and longrope
    # configs already state the extended one.
    factor = float(params.get("factor") or 1.0)
    if kind in ("linear", "dynamic"):
        max_pos = int(max_pos * factor)
    elif kind == "yarn":
        max_pos = max(max_pos, int(int(params.get("original_max_position_embeddings") or max_pos) * factor))
    desc = {"rope_parameters": params, "max_position_embeddings": int(cfg.max_position_embeddings),
            "hidden_size": int(cfg.hidden_size), "num_attention_heads": int(cfg.num_attention_heads),
            "head_dim": int(head_dim)}
    return json.dumps(desc, sort_keys=True), max_pos


def rope_kind(desc: str) -> str:
    return json.loads(desc)["rope_parameters"].get("rope_type", "default") if desc else "default"


def needs_host_lengths(desc: str) -> bool:
    """`dynamic` computes frequencies per sequence length on the host (a device read per pass on
    a GPU, so its draft steps are not captured as CUDA graphs)."""
    return rope_kind(desc) == "dynamic"


@functools.lru_cache(maxsize=8)
def _config(desc: str):
    """A transformers config holding just what the rope functions read."""
    from transformers import PretrainedConfig

    cfg = PretrainedConfig()
    for k, v in json.loads(desc).items():
        setattr(cfg, k, v)
    return cfg


class RopeTable:
    """Inverse frequencies and attention scaling of one model's RoPE on one device."""

    def __init__(self, desc: str, head_dim: int, theta: float, device):
        self.kind, self.device = rope_kind(desc), torch.device(device)
        if not desc:
            # What transformers' compute_default_rope_parameters computes.
            self.inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
            self.scale = 1.0
            return
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        self.cfg = _config(desc)
        self.fn = ROPE_INIT_FUNCTIONS[self.kind]
        # As the rotary module's __init__: the frequencies a short sequence uses, and the scaling.
        self.inv, self.scale = self.fn(self.cfg, self.device)
        self.inv = self.inv.to(self.device)
        params = self.cfg.rope_parameters
        if self.kind == "longrope":
            self.limit = int(params["original_max_position_embeddings"])
            self.long = self.fn(self.cfg, self.device, seq_len=self.limit + 1)[0].to(self.device)
        elif self.kind == "dynamic":
            self.limit = int(self.cfg.max_position_embeddings)
            self.grown: dict[int, torch.Tensor] = {}  # seq_len -> its frequencies, as transformers grows them

    @property
    def length_dependent(self) -> bool:
        return self.kind in ("dynamic", "longrope")

    def _inv_per_token(self, seq_lens: torch.Tensor) -> torch.Tensor:
        if self.kind == "longrope":  # the same choice as transformers' torch.where on seq_len
            return torch.where((seq_lens > self.limit)[:, None], self.long[None], self.inv[None])
        over = seq_lens > self.limit
        out = self.inv[None].expand(seq_lens.shape[0], -1)
        lens = sorted(set(seq_lens[over].tolist()))  # a device read: see needs_host_lengths
        if not lens:
            return out
        for s in lens:
            if s not in self.grown:
                # transformers passes seq_len as a 0-d int64 tensor; so do we, for the same floats
                # (a batched call over many lengths rounds differently).
                self.grown[s] = self.fn(self.cfg, self.device, seq_len=torch.tensor(s, device=self.device))[0]
        table = torch.stack([self.inv] + [self.grown[s] for s in lens])
        idx = torch.searchsorted(torch.tensor(lens, device=seq_lens.device), seq_lens) + 1
        return table[torch.where(over, idx, 0)]

    def cos_sin(self, positions: torch.Tensor, dtype, seq_lens: torch.Tensor | None = None):
        """cos/sin [T, head_dim] for packed positions; `seq_lens` per token (see the module doc;
        default position + 1) matter for dynamic and longrope only."""
        pos = positions.float()[:, None]
        if self.length_dependent:
            if seq_lens is None:
                seq_lens = positions + 1
            freqs = pos * self._inv_per_token(seq_lens.to(positions.device))
        else:
            freqs = pos * self.inv[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        if self.scale == 1.0:  # transformers multiplies by 1.0 too: exact, skipped
            return emb.cos().to(dtype), emb.sin().to(dtype)
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)


_TABLES: dict = {}


def rope_table(spec, device) -> RopeTable:
    key = (spec.rope, spec.head_dim, spec.rope_theta, str(device))
    if key not in _TABLES:
        _TABLES[key] = RopeTable(spec.rope, spec.head_dim, spec.rope_theta, device)
    return _TABLES[key]


def prefill_aware_seq_lens(lens_before: torch.Tensor, q_lens: torch.Tensor, b_idx: torch.Tensor,
                           positions: torch.Tensor) -> torch.Tensor:
    """Per packed token, the seq_len transformers would have used (module doc): a sequence's
    whole prompt length for a pass that starts at 0, else position + 1."""
    return torch.where(lens_before[b_idx] == 0, q_lens[b_idx], positions + 1)
