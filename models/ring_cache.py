"""A draft KV cache that keeps only the last W tokens of each sequence, as a ring.

Slot = position mod capacity, and each slot remembers the absolute position it holds. Keys
carry RoPE for their absolute positions and attention is a sum over keys, so slot order
does not matter: the mask alone (0 <= key pos <= query pos, key pos > query pos - W)
decides what a query sees. Rolled-back slots need no clearing: their positions lie past
every later query until they are overwritten. Capacity W + (tokens per pass) - 1 keeps a
pass's new tokens from overwriting keys its own queries still see.

Optionally the first S positions of each sequence ("attention sinks") stay in S extra
slots for good, and every query may also see them; models put much attention on the first
tokens, so a window that drops them changes the draft more than its size suggests.

Optionally stored in fp8 (e4m3) with one scale per layer and KV head, set from the first
tokens written (the draft's prefill); later values are clamped. Only the draft's view is
shortened or rounded: the target still verifies every token, so output stays exact.
"""

from __future__ import annotations

import torch

from .attention import KVCache, grouped_attention, pack_index
from .host_io import packed

FP8_MAX = 448.0


class RingKVCache(KVCache):
    def __init__(self, num_layers, batch, num_kv_heads, head_dim, window, max_new, dtype, device="cpu",
                 windows=None, fp8: bool = False, sinks: int = 0):
        self.window, self.sinks = int(window), int(sinks)
        self.ring = self.window + max_new  # slots that rotate; the sink slots come first
        capacity = self.sinks + self.ring
        self.fp8 = fp8
        self.compute_dtype = dtype
        store = torch.float8_e4m3fn if fp8 else dtype
        super().__init__(num_layers, batch, num_kv_heads, head_dim, capacity, store, device, windows)
        self.pos = torch.full((batch, capacity), -1, dtype=torch.long, device=device)
        self.k_scale = [None] * num_layers
        self.v_scale = [None] * num_layers

    def begin_pass(self, q_lens: torch.Tensor, total: int | None = None, n_q: int | None = None):
        q_lens = q_lens.to(self.lens.device)
        if n_q is None:  # a device read, once per pass: the most new tokens of any sequence
            n_q = int(q_lens.max()) if len(q_lens) else 0
        if n_q > self.ring:
            raise RuntimeError("more new tokens in one pass than the ring holds")
        b_idx, i_idx = pack_index(q_lens, total, n_q)
        pos = self.lens[b_idx] + i_idx
        S = self.sinks
        slot = torch.where(pos < S, pos, S + pos % self.ring) if S else pos % self.ring
        self.pos[b_idx, slot] = pos
        qpos = self.lens[:, None] + torch.arange(n_q, device=self.lens.device)[None, :]  # [B, n_q]
        kpos = self.pos[:, None, :]  # [B, 1, C]
        masks = {}
        for w in set(self.windows):
            lim = self.window if w is None else min(w, self.window)
            seen = kpos > qpos[:, :, None] - lim
            if S:
                seen |= kpos < S
            m = (kpos >= 0) & (kpos <= qpos[:, :, None]) & seen
            pad = torch.arange(n_q, device=self.lens.device)[None, :] >= q_lens[:, None]
            m |= pad[:, :, None]  # padded query rows: anything, their output is dropped
            masks[w] = m[:, None]
        self._pass = (q_lens, b_idx, i_idx, masks, slot, n_q)
        self._grouped = {}  # (window, G) -> the pass's mask repeated for G query heads

    def _store(self, j, which, x):
        if not self.fp8:
            return x.to(self.compute_dtype)
        scales = self.k_scale if which == "k" else self.v_scale
        if scales[j] is None:
            scales[j] = (x.float().abs().amax(dim=(0, 2)) / FP8_MAX).clamp_min(1e-8)  # [Hkv]
        return (x.float() / scales[j][None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)

    def attend_layer(self, layer, q, k, v):
        q_lens, b_idx, i_idx, masks, slot, n_q = self._pass
        self.k[layer][b_idx, :, slot] = self._store(layer, "k", k)
        self.v[layer][b_idx, :, slot] = self._store(layer, "v", v)
        # fp8 keys and values are only widened here, not scaled: a per-head scale on K is the
        # same scale on q (q.(s k) = (s q).k), and on V the same scale on the output. Scaling
        # the whole ring every step cost ~5 ms of a 23 ms draft step (profile_draft, H200).
        kk, vv = self.k[layer].to(self.compute_dtype), self.v[layer].to(self.compute_dtype)
        scales = (self.k_scale[layer], self.v_scale[layer]) if self.fp8 else (None, None)
        return grouped_attention(q, kk, vv, self._grouped_mask(masks, layer, q), n_q, b_idx, i_idx, *scales)

    def part(self, lo: int, hi: int) -> "RingKVCache":
        p = super().part(lo, hi)
        p.pos = self.pos[lo:hi]  # a view: slot positions written through the part land here
        return p

    def to(self, device) -> "RingKVCache":
        c = super().to(device)
        c.pos = self.pos.to(device, copy=True)
        return c

    def load(self, other: "RingKVCache"):
        self.pos.copy_(other.pos)
        super().load(other)

    def select(self, keep: torch.Tensor) -> torch.Tensor:
        keep = super().select(keep)
        self.pos = self.pos[keep]
        return keep

    def _used(self, other) -> int:
        return self.capacity  # slots hold positions in any order

    def _positions_used(self, rows) -> int:
        return self.capacity  # the same: a row's slots are not in position order

    def _check_joins(self, other: "RingKVCache", what: str):
        if other.ring != self.ring or other.sinks != self.sinks:
            raise ValueError(f"{what} needs a ring of the same size")
        super()._check_joins(other, what)

    def append(self, other: "RingKVCache"):
        super().append(other)
        self.pos = torch.cat([self.pos, other.pos.to(self.pos.device)])

    def put_rows(self, rows, other: "RingKVCache"):
        idx = super().put_rows(rows, other)
        self.pos[idx] = other.pos.to(self.pos.device)
        return idx

    def start_at(self, lens: torch.Tensor):
        """Sequences whose first cached token is not position 0 (a window re-prefill)."""
        self.lens = lens.to(self.lens.device).clone()


def window_view(prompt: list[int], window: int | None, sinks: int = 0) -> tuple[list[int], int, list[int]]:
    """What a windowed draft is primed with: (sink tokens, start of the window, window tokens).
    A prompt that fits the window is seen whole, from position 0; the window part never holds
    more than `window` tokens (the ring's rotating slots are sized for that)."""
    if window is None or len(prompt) <= window:
        return [], 0, list(prompt)
    start = max(sinks, len(prompt) - window)
    return list(prompt[:sinks]), start, list(prompt[start:])


@torch.inference_mode()
def prime(model, cache: KVCache, prompts: list[list[int]], window: int | None, sinks: int = 0,
          chunk: int | None = None, which="last"):
    """Feed a draft the prompts as it sees them (sinks at positions 0.., then the window at its
    true positions), `chunk` sequences at a time. Returns the last-token logits when one chunk
    holds every sequence and `which` is "last", else None."""
    views = [window_view(p, window, sinks) for p in prompts]
    n, dev = len(prompts), model.device
    chunk = chunk or n
    out = None
    for phase in ("sinks", "window"):
        if phase == "sinks":
            segs = [v[0] for v in views]
            if not any(segs):
                continue
        else:
            segs = [v[2] for v in views]
            if window is not None:
                cache.start_at(torch.tensor([v[1] for v in views]))
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            if not any(segs[lo:hi]):
                continue
            # A chunk runs on a view of its own rows: attention and masks cost what the chunk
            # holds, not the whole batch.
            part = cache.part(lo, hi) if chunk < n else cache
            toks, q_lens = packed(segs[lo:hi], dev)
            last = phase == "window" and chunk >= n and which == "last"
            out = model.forward(part, toks, q_lens, which="last" if last else None)
            if part is not cache:
                cache.merge(lo, part)
    return out
