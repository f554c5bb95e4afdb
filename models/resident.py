"""A whole model held in one place (the plain reference path, and the GPU-resident draft)."""

from __future__ import annotations

from functools import partial

import torch

from .attention import KVCache, pack_index
from .forward import Forward
from .fp8_weights import gathered, layer_nbytes, quantize_layer
from .rope import prefill_aware_seq_lens, rope_table
from .spec import ModelSpec


def positions_of(cache: KVCache, q_lens: torch.Tensor, total: int | None = None,
                 n_q: int | None = None) -> torch.Tensor:
    b, i = pack_index(q_lens, total, n_q)
    return cache.lens.to(q_lens.device)[b] + i


def _positions_and_lens(spec: ModelSpec, cache: KVCache, q_lens, total, n_q):
    """Packed positions, and for RoPE that depends on the length (models/rope.py) the seq_len
    of each token's pass as transformers would have run it."""
    if not rope_table(spec, q_lens.device).length_dependent:
        return positions_of(cache, q_lens, total, n_q), None
    b, i = pack_index(q_lens, total, n_q)
    lens = cache.lens.to(q_lens.device)
    pos = lens[b] + i
    return pos, prefill_aware_seq_lens(lens, q_lens, b, pos)


def last_index(q_lens: torch.Tensor) -> torch.Tensor:
    """Packed index of each sequence's last new token."""
    return torch.cumsum(q_lens, 0) - 1


class ResidentModel:
    def __init__(self, spec: ModelSpec, globals_: dict, layers: list[dict], device="cpu", fp8_weights: bool = False):
        """fp8_weights: keep the layers' dense matrices in fp8 (models/fp8_weights.py; drafts
        only, the output of a target must not change)."""
        self.spec, self.device = spec, torch.device(device)
        mv = lambda t: t.to(self.device, non_blocking=True)  # noqa: E731
        self.glob = {k: mv(v) for k, v in globals_.items()}
        if globals_["head"] is globals_["embed"]:
            self.glob["head"] = self.glob["embed"]
        self.fp8_weights = fp8_weights
        self.layers = [self._prepared({k: mv(v) for k, v in w.items()}) for w in layers]

    def _prepared(self, w: dict) -> dict:
        # fp8 matrices (an fp8 target's) become Fp8Weights once here, not on every call
        return quantize_layer(w) if self.fp8_weights else gathered(w)

    def weight_bytes(self) -> int:
        """Device bytes of the layers and globals (what the draft costs the GPU)."""
        glob = {id(v): v.numel() * v.element_size() for v in self.glob.values()}
        return sum(layer_nbytes(w) for w in self.layers) + sum(glob.values())

    @classmethod
    def from_source(cls, source, device="cpu", num_layers=None, progress=False, fp8_weights: bool = False):
        n = num_layers or source.spec.num_layers
        spec = source.spec if n == source.spec.num_layers else source.spec.with_layers(n)
        rng = range(n)
        if progress:
            from tqdm import tqdm

            rng = tqdm(rng, desc="loading layers", unit="layer")
        dev = torch.device(device)
        # Move (and quantize) each layer as it is read, so neither host nor device memory ever
        # holds the whole model in its checkpoint dtype.
        prep = quantize_layer if fp8_weights else dict
        layers = [prep({k: v.to(dev) for k, v in source.read_layer(j).items()}) for j in rng]
        return cls(spec, source.read_globals(), layers, device, fp8_weights=fp8_weights)

    def new_cache(self, batch: int, capacity: int, window: int | None = None, fp8: bool = False,
                  max_new: int = 16, sinks: int = 0, device=None) -> KVCache:
        """A full cache of `capacity` tokens, or (window set) a ring of the last `window`
        (plus the first `sinks` positions of each sequence), on `device` (default: the model's)."""
        s = self.spec
        device = self.device if device is None else device
        if window is not None:
            from .ring_cache import RingKVCache

            return RingKVCache(s.num_layers, batch, s.num_kv_heads, s.head_dim, window, max_new,
                               s.torch_dtype, device, s.sliding_windows, fp8=fp8, sinks=sinks)
        return KVCache(s.num_layers, batch, s.num_kv_heads, s.head_dim, capacity,
                       s.torch_dtype, device, s.sliding_windows)

    @torch.inference_mode()
    def forward(self, cache: KVCache, tokens: torch.Tensor, q_lens: torch.Tensor, which="last",
                n_q: int | None = None):
        """Run new tokens (packed) through every layer; logits of the last ("last") or of
        every ("all") new token, fp32. `n_q`: the most new tokens of any sequence, if the
        caller knows it (saves the cache a device read)."""
        tokens, q_lens = tokens.to(self.device), q_lens.to(self.device)
        T = tokens.shape[0]
        pos, seq_lens = _positions_and_lens(self.spec, cache, q_lens, T, n_q)
        f = Forward.start(self.spec, self.glob, tokens, pos, seq_lens)
        cache.begin_pass(q_lens, T, n_q)
        for j, w in enumerate(self.layers):
            f.layer(w, partial(cache.attend_layer, j))
        cache.advance()
        if which is None:
            return None
        return f.logits(last_index(q_lens) if which == "last" else None)
