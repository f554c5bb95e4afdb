"""One forward pass over packed tokens, a layer at a time: embedding and RoPE once, each
layer's two halves around attention, the head. The reference model runs it whole
(`ResidentModel.forward`); the executor runs a layer per call for prefill, and each half
in its own call for verification, with attention in the CPU worker between them."""

from __future__ import annotations

import torch

from .layers import embed, head, post_attention, pre_attention, rope_cos_sin
from .spec import ModelSpec


class Forward:
    def __init__(self, spec: ModelSpec, glob: dict, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 fused=None):
        """h [T, H]: the residual stream of T packed tokens; cos/sin: their RoPE; glob: the
        embedding, final norm and head; fused: models.fused.FUSED, the layers' elementwise work
        fused, the same values (plan.fused_prefill), or None."""
        self.spec, self.glob, self.h, self.cos, self.sin, self.fused = spec, glob, h, cos, sin, fused

    @classmethod
    def start(cls, spec: ModelSpec, glob: dict, tokens: torch.Tensor, positions: torch.Tensor,
              seq_lens: torch.Tensor | None = None, fused=None) -> "Forward":
        """A pass over packed `tokens` at `positions`: embedded, RoPE computed once (`seq_lens`:
        per token, the length a length-dependent RoPE uses; see layers.rope_cos_sin; `fused`: as
        the constructor's)."""
        cos, sin = rope_cos_sin(spec, positions, spec.torch_dtype, seq_lens)
        return cls(spec, glob, embed(glob["embed"], tokens), cos, sin, fused)

    def qkv(self, w: dict):
        """A layer's first half: norm, q/k/v projections, RoPE."""
        return pre_attention(self.spec, w, self.h, self.cos, self.sin, self.fused)

    def finish(self, w: dict, attn: torch.Tensor):
        """A layer's second half, given its attention output: projection, residual, FFN."""
        self.h = post_attention(self.spec, w, self.h, attn, self.fused)

    def layer(self, w: dict, attend):
        """A whole layer, attention by `attend(q, k, v) -> [T, Hq * d]`."""
        self.finish(w, attend(*self.qkv(w)))

    def logits(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm and head (fp32) over every token, or over `rows` of them."""
        return head(self.spec, self.glob["norm"], self.glob["head"], self.h if rows is None else self.h[rows])

    def split(self, bounds: list[tuple[int, int]]) -> list["Forward"]:
        """The pass as consecutive token ranges [lo, hi), each run on its own (micro-batches)."""
        return [Forward(self.spec, self.glob, self.h[lo:hi], self.cos[lo:hi], self.sin[lo:hi], self.fused)
                for lo, hi in bounds]

    @staticmethod
    def logits_of(parts: list["Forward"]) -> torch.Tensor:
        """Logits of every token of a pass run as `split` parts, in order."""
        p = parts[0]
        return head(p.spec, p.glob["norm"], p.glob["head"], torch.cat([x.h for x in parts]))
