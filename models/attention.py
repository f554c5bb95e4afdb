"""Attention as a function of q and a KV cache, so it can run on any device or process.

The cache of one layer is [B, Hkv, capacity, d] with a length per sequence. New tokens of
a pass (prefill: the prompt; decode: 1; verification: k+1) are appended, then their
queries attend causally to everything up to and including their own position. Grouped
query attention runs as Hkv heads of G x n_q query rows (the G query heads that share a K/V
head become extra rows), never a repeat of K/V, and the cache is read once per layer per pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import huge_pages as huge_pages_mod
from .host_io import to_device


def pack_index(q_lens: torch.Tensor, total: int | None = None, n_q: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """For packed tokens: (sequence index, index within that sequence's new tokens).

    Pass `total` (the packed length, known from the tokens' shape) to avoid a device sync,
    and `n_q` (the most new tokens of any sequence) if known: one token each needs no scan.
    """
    if n_q == 1 and total == len(q_lens):
        return torch.arange(total, device=q_lens.device), torch.zeros(total, dtype=torch.long, device=q_lens.device)
    if total is None:
        total = int(q_lens.sum())
    b = torch.repeat_interleave(torch.arange(len(q_lens), device=q_lens.device), q_lens, output_size=total)
    starts = torch.cumsum(q_lens, 0) - q_lens
    i = torch.arange(total, device=q_lens.device) - starts[b]
    return b, i


def causal_mask(lens_before: torch.Tensor, q_lens: torch.Tensor, n_q: int, n_k: int, window=None):
    """Boolean [B, 1, n_q, n_k]: query i of sequence b sits at position lens_before[b] + i."""
    dev = lens_before.device
    qpos = lens_before[:, None] + torch.arange(n_q, device=dev)[None, :]  # [B, n_q]
    kpos = torch.arange(n_k, device=dev)
    m = kpos[None, None, :] <= qpos[:, :, None]
    if window is not None:
        m &= kpos[None, None, :] > qpos[:, :, None] - window
    # Padded query rows (i >= q_len) see key 0 only, so SDPA never meets an all-masked row.
    pad = torch.arange(n_q, device=dev)[None, :] >= q_lens[:, None]
    m |= pad[:, :, None] & (kpos == 0)[None, None, :]
    return m[:, None]


def append_kv(cache_k, cache_v, k, v, lens_before, q_lens, b_idx=None, i_idx=None):
    """Write packed new k/v [T, Hkv, d] at each sequence's next free positions."""
    if b_idx is None:
        b_idx, i_idx = pack_index(q_lens)
    pos = lens_before[b_idx] + i_idx
    cache_k[b_idx, :, pos] = k.to(cache_k.dtype)
    cache_v[b_idx, :, pos] = v.to(cache_v.dtype)


# The fixed cost of one SDPA call on the CPU (dispatch, the mask's and output's slices), in
# attention positions (one row x one key): `ragged_chunks` pads a row to a neighbour's length
# only while that wastes fewer positions than a call of its own costs. 512 is a guess that
# scripts/profile_ragged_attention.py put near the best on a 2-core machine (1.3-1.5x the
# padded call over 48 rows of 128-1280 keys); not yet measured with the GPU machine's 14
# attention threads, where a call of one row has only Hkv tasks to share among them.
RAGGED_CALL_KEYS = 512
# Whether a host KVCache attends in `ragged_chunks`' ranges unless told (see KVCache).
RAGGED_ROWS = False
# At most this many query rows per K/V head in one CPU SDPA call (None: no limit). torch's CPU
# flash attention in bf16, where the CPU can pack (AMX), repacks the whole K/V of a call once a
# head has 64 or more query rows and its heuristic expects the pack to pay, which it does for a
# verification block of G * (k + 1) rows (64 for W4, G 8, at k 7) and does not pay: on the GPU
# machine's CPU, W4's 192 x 8 queries over 580 keys took 67.7 ms a layer in one call and 38.3 ms
# in two calls of 32 rows; 192 x 7 (56 rows, no repack) took 30.9 ms in one call and 37.4 in two
# (`scripts/profile_cpu_attention.py --variants split-rows`, docs/benchmarks.md "Session 23").
# So only blocks of 64 rows or more are split, into the fewest calls of near-equal size.
# A KVCache's `max_rows` overrides it (plan.cpu_query_rows reaches the CPU worker's caches so).
CPU_QUERY_ROWS: int | None = 63


def query_row_limit(max_rows: int | None) -> int | None:
    """The query-row limit a call or cache given `max_rows` applies (None: none): None takes
    CPU_QUERY_ROWS, 0 means no limit."""
    return (CPU_QUERY_ROWS if max_rows is None else max_rows) or None


def row_calls(rows: int, max_rows: int | None) -> int:
    """SDPA calls for `rows` query rows per K/V head at most max_rows each (None or 0: one)."""
    return 1 if not max_rows or rows <= max_rows else -(-rows // max_rows)


# Whether GPU attention may use cuDNN's SDPA (see gpu_attention_backends). Off: recent torch
# puts cuDNN first on sm90/sm100 for masked bf16 calls, and cuDNN builds an execution graph on
# the host for every new (batch, key length) shape (tens of ms each; cached per shape only).
# The GPU rows' key length grows every pass and rows finish, so each pass built one: 38.7 ms
# a call at a new key length against 0.62 without cuDNN (scripts/profile_gpu_rows.py, H100,
# w1-long's shapes; docs/benchmarks.md, W1-long "Session 32"), the ~10 ms a layer GPU rows had
# added to the executor. The memory-efficient kernel takes the same masks and shapes with no
# per-shape build.
GPU_CUDNN_ATTENTION = False


def gpu_attention_backends() -> None:
    """Apply GPU_CUDNN_ATTENTION to this process (the executor calls it once, on CUDA): torch's
    SDPA backend choice is process-wide, and every GPU attention call comes through here."""
    torch.backends.cuda.enable_cudnn_sdp(GPU_CUDNN_ATTENTION)


def _sdpa_rows(q, k, v, mask, max_rows: int | None):
    """SDPA over q [B, H, R, d] in the fewest calls of at most max_rows query rows each, of
    near-equal size (64 rows at most 63: two of 32, not 63 and 1); CPU only."""
    R = q.shape[2]
    calls = row_calls(R, max_rows)
    if calls == 1 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    step = -(-R // calls)
    res = torch.empty_like(q)
    for a in range(0, R, step):
        b = min(R, a + step)
        res[:, :, a:b] = F.scaled_dot_product_attention(q[:, :, a:b], k, v, attn_mask=mask[:, :, a:b])
    return res


def ragged_chunks(n_k: list[int], call_keys: int | None = None) -> list[tuple[int, int, int]]:
    """Contiguous row ranges [a, b) with the keys n each needs, so that rows of very different
    lengths are not all padded to the longest (a batch of 128- to 1,280-token rows read 2-3x
    the K/V it uses). Greedy, left to right: a row joins the current range when the padding
    that adds costs no more than a call of its own (`call_keys`, default RAGGED_CALL_KEYS)."""
    if call_keys is None:
        call_keys = RAGGED_CALL_KEYS
    out: list[tuple[int, int, int]] = []
    a, top = 0, 0
    for i, n in enumerate(n_k):
        if i > a and (i + 1 - a) * max(top, n) > (i - a) * top + n + call_keys:
            out.append((a, i, top))
            a, top = i, n
        else:
            top = max(top, n)
    if n_k:
        out.append((a, len(n_k), top))
    return out


def grouped_mask(mask: torch.Tensor, G: int) -> torch.Tensor:
    """[B, 1, n_q, n_k] -> [B, 1, G * n_q, n_k]: each query's mask repeated for the G query
    heads that share a K/V head, in the row order `attend` uses."""
    if G == 1:
        return mask
    B, _, n_q, n_k = mask.shape
    return mask[:, :, None].expand(B, 1, G, n_q, n_k).reshape(B, 1, G * n_q, n_k)


def grouped_attention(q, cache_k, cache_v, mask, n_q: int, b_idx, i_idx, q_scale=None, out_scale=None, out=None,
                      chunks=None, max_rows: int | None = None):
    """Packed queries q [T, Hq, d] of B = cache_k.shape[0] sequences (at most n_q each; row
    b_idx[t], position i_idx[t]) against K/V [B, Hkv, n_k, d] under a `grouped_mask` mask.
    Returns [T, Hq * d] in q's dtype, written into `out` if given (a contiguous [T, Hq * d]:
    the heads' transpose lands there in one copy instead of a fresh tensor copied again).
    q_scale / out_scale: per-K/V-head factors on the queries and the output (an fp8 ring's K
    and V scales, see ring_cache.py). chunks: `ragged_chunks`' row ranges, each attending over
    only the keys its rows hold (one SDPA call per range); None: one call over all n_k.
    max_rows: query rows per K/V head in one call on the CPU (None: `CPU_QUERY_ROWS`; 0: no limit).

    Grouped-query attention as Hkv heads of G * n_q query rows (the G query heads that share a
    K/V head become extra rows), so K/V are never expanded G-fold: faster on the CPU than SDPA's
    `enable_gqa`, with identical output, and CPU attention bounds a verification pass's layers
    once k is large (figures: docs/benchmarks.md, scripts/profile_cpu_attention.py).
    """
    T, Hq, d = q.shape
    B, Hkv = cache_k.shape[:2]
    G = Hq // Hkv
    full = T == B * n_q  # every sequence has n_q new tokens (a draft step, a verification pass)
    if full:
        qp = q.view(B, n_q, Hq, d)
    else:
        qp = q.new_zeros(B, n_q, Hq, d)
        qp[b_idx, i_idx] = q
    qg = qp.permute(0, 2, 1, 3).reshape(B, Hkv, G * n_q, d).to(cache_k.dtype)  # head h = kv * G + g
    if q_scale is not None:
        qg = qg * q_scale.to(qg.dtype)[None, :, None, None]
    max_rows = query_row_limit(max_rows)
    if chunks is None or len(chunks) < 2:
        res = _sdpa_rows(qg, cache_k, cache_v, mask, max_rows)  # [B, Hkv, G*n_q, d]
    else:
        res = torch.empty_like(qg)
        for a, b, n in chunks:
            res[a:b] = _sdpa_rows(qg[a:b], cache_k[a:b, :, :n], cache_v[a:b, :, :n], mask[a:b, ..., :n], max_rows)
    if out_scale is not None:
        res = res * out_scale.to(res.dtype)[None, :, None, None]
    res = res.reshape(B, Hq, n_q, d).transpose(1, 2)  # [B, n_q, Hq, d] (SDPA may return it strided)
    if out is not None:
        if full:
            out.view(B, n_q, Hq, d).copy_(res)
        else:
            out.view(T, Hq, d).copy_(res[b_idx, i_idx])
        return out
    return (res if full else res[b_idx, i_idx]).reshape(T, Hq * d).to(q.dtype)


def attend(q, cache_k, cache_v, lens_before, q_lens, window=None, mask=None, b_idx=None, i_idx=None,
           n_q=None, n_k=None, grouped: bool = False, out=None, chunks=None, max_rows: int | None = None):
    """Packed queries q [T, Hq, d] against caches that already hold the new tokens, causally.

    Returns [T, Hq * d] in q's dtype. `mask`/`b_idx`/`i_idx` may be passed in to reuse them
    across layers of one pass (they depend only on the lengths); `grouped`: the mask is
    already `grouped_mask`'s; `out`: where to write the result; `chunks`: row ranges attended
    one call each (`ragged_chunks`); `max_rows`: query rows per call. See `grouped_attention`.
    """
    if b_idx is None:
        b_idx, i_idx = pack_index(q_lens)
    if n_q is None:
        n_q = int(q_lens.max()) if q.shape[0] else 0
    if n_k is None:
        n_k = int((lens_before + q_lens).max())
    if mask is None:
        mask = causal_mask(lens_before, q_lens, n_q, n_k, window)
    if not grouped:
        mask = grouped_mask(mask, q.shape[1] // cache_k.shape[1])
    return grouped_attention(q, cache_k[:, :, :n_k], cache_v[:, :, :n_k], mask, n_q, b_idx, i_idx, out=out,
                             chunks=chunks, max_rows=max_rows)


def fits_storage(storage: tuple[list, list], num_layers: int, shape: tuple, dtype) -> bool:
    """Whether per-layer (k, v) tensors can hold a cache of `shape` ([B, Hkv, capacity, d]) in
    their first B rows and first `capacity` positions."""
    k, v = storage
    B, H, C, d = shape
    return len(k) == len(v) == num_layers and all(
        t.dtype == dtype and t.shape[0] >= B and t.shape[1] == H and t.shape[2] >= C and t.shape[3] == d
        for t in k + v)


class KVCache:
    """Per-layer K/V of one batch of sequences, with one length per sequence.

    `attend_layer` appends the pass's new tokens and attends; `advance` commits the pass's
    lengths once all layers are done; `truncate` rolls back rejected speculative tokens.
    """

    def __init__(self, num_layers, batch, num_kv_heads, head_dim, capacity, dtype, device="cpu",
                 windows=None, ragged: bool | None = None, call_keys: int | None = None,
                 max_rows: int | None = None, storage: tuple[list, list] | None = None, huge_pages: bool = False):
        """storage: (k, v) per-layer tensors of `batch` rows and `capacity` positions or more,
        of a cache no longer used (CPUAttention's spare storage), taken as they are instead of
        new zeroed ones: what they hold is K/V written before, and every position past a row's
        length is masked. huge_pages: new host storage asked for in 2 MiB pages
        (plan.kv_huge_pages, models/huge_pages.py)."""
        shape = (batch, num_kv_heads, capacity, head_dim)
        if storage is not None and fits_storage(storage, num_layers, shape, dtype):
            base = (list(storage[0]), list(storage[1]))
        else:
            base = ([huge_pages_mod.zeros(shape, dtype, device, huge_pages) for _ in range(num_layers)],
                    [huge_pages_mod.zeros(shape, dtype, device, huge_pages) for _ in range(num_layers)])
        self.k, self.v = [t[:batch, :, :capacity] for t in base[0]], [t[:batch, :, :capacity] for t in base[1]]
        self.lens = torch.zeros(batch, dtype=torch.long, device=device)
        self.capacity = capacity
        self.windows = windows or (None,) * num_layers
        self._pass = None
        self._base = base  # the full-height storage that `select` in place leaves behind
        # ragged: rows of different lengths attend in ranges of similar ones (`ragged_chunks`),
        # on the CPU only (on a GPU one padded call beats many small ones). Off by default: on
        # many threads a range of few rows leaves threads idle, and whether the keys saved pay
        # for that is not yet measured where it matters (docs/benchmarks.md, "Ragged rows").
        self.ragged = (RAGGED_ROWS if ragged is None else ragged) and torch.device(device).type == "cpu"
        self.call_keys = call_keys  # ragged_chunks' call cost (None: RAGGED_CALL_KEYS)
        self.max_rows = max_rows  # query rows per K/V head per CPU SDPA call (None: CPU_QUERY_ROWS; 0: no limit)
        self._chunks = None
        self._row_calls = 1  # calls each range's query rows took in the last layer attended

    @property
    def calls(self) -> int:
        """SDPA calls the last layer attended made: ragged ranges (or one) x row splits."""
        return (len(self._chunks) if self._chunks else 1) * self._row_calls

    @property
    def batch(self) -> int:
        return self.lens.shape[0]

    def begin_pass(self, q_lens: torch.Tensor, total: int | None = None, n_q: int | None = None,
                   n_k: int | None = None):
        """n_k: the longest row after the pass, where the caller knows it on the host (a fresh
        prefill cache: the longest prompt), so that a device cache is not read here: the read
        would wait for everything queued on the stream."""
        q_lens = q_lens.to(self.lens.device)
        if n_k is None:
            n_k = int((self.lens + q_lens).max())
        if n_k > self.capacity:
            raise RuntimeError("KV cache capacity exceeded")
        b_idx, i_idx = pack_index(q_lens, total)
        if n_q is None:
            n_q = int(q_lens.max())
        masks = {w: causal_mask(self.lens, q_lens, n_q, n_k, w) for w in set(self.windows)}
        self._pass = (q_lens, b_idx, i_idx, masks, n_q, n_k)
        self._chunks = ragged_chunks((self.lens + q_lens).tolist(), self.call_keys) if self.ragged else None
        self._grouped = {}  # (window, G) -> the pass's mask grouped for attention, built once

    def _grouped_mask(self, masks: dict, layer: int, q: torch.Tensor) -> torch.Tensor:
        """The pass's mask for `layer`'s window, grouped for `grouped_attention` (once per pass)."""
        key = (self.windows[layer], q.shape[1] // self.k[layer].shape[1])
        if key not in self._grouped:
            self._grouped[key] = grouped_mask(masks[key[0]], key[1])
        return self._grouped[key]

    def attend_layer(self, layer, q, k, v, out=None):
        q_lens, b_idx, i_idx, masks, n_q, n_k = self._pass
        append_kv(self.k[layer], self.v[layer], k, v, self.lens, q_lens, b_idx, i_idx)
        if self.k[layer].device.type == "cpu":
            self._row_calls = row_calls(q.shape[1] // self.k[layer].shape[1] * n_q, query_row_limit(self.max_rows))
        return attend(q, self.k[layer], self.v[layer], self.lens, q_lens, self.windows[layer],
                      self._grouped_mask(masks, layer, q), b_idx, i_idx, n_q, n_k, grouped=True, out=out,
                      chunks=self._chunks, max_rows=self.max_rows)

    def advance(self):
        self.lens += self._pass[0]
        self._pass = None

    def truncate(self, new_lens: torch.Tensor):
        new_lens = new_lens.to(self.lens.device)
        # Checked on the host only: on a GPU the check is a device read every round, and the
        # callers derive new_lens from the old ones.
        if new_lens.device.type == "cpu" and bool((new_lens > self.lens).any()):
            raise RuntimeError("truncate cannot extend a sequence")
        # In place: a draft step captured as a CUDA graph reads the lengths from this storage.
        self.lens.copy_(new_lens)

    def select(self, keep: torch.Tensor) -> torch.Tensor:
        """Keep only the sequences at indices `keep` (finished ones leave the batch), in that
        order, in the same storage: a later `append` then lands there without allocating. When
        every kept row stays put or comes from a row past the new end (the generator's
        `fill_holes` order), only the moved rows are copied; any other order (rows that joined
        in GPU-rows order, placement/gpu_kv_rows.merge_order) gathers one layer's K or V at a
        time. New storage here used to double the cache for a moment and leave it too small for
        the next join's rows: on a full GPU that ran out of memory mid-merge (session 29, W1-long
        with GPU rows). Returns `keep` on the cache's device (for subclasses that index more
        per-row state)."""
        kh = torch.as_tensor(keep, dtype=torch.long).cpu()  # callers pass host indices: no device read
        keep = to_device(kh, self.lens.device, torch.long)
        n = keep.shape[0]
        rows = torch.arange(n)
        moved = kh != rows
        if bool((kh[moved] >= n).all()):
            dst, src = to_device(rows[moved], keep.device), to_device(kh[moved], keep.device)
            used = self._positions_used(kh[moved])
            for t in self.k + self.v:
                if len(dst):
                    t[dst, :, :used] = t[src, :, :used]  # sources lie past the new end: never overwritten first
        else:
            used = self._positions_used(kh)
            for t in self.k + self.v:
                t[:n, :, :used] = t[keep, :, :used]  # the gather is a copy of its own: no row is read after it is written
        self.k = [t[:n] for t in self.k]
        self.v = [t[:n] for t in self.v]
        self.lens = self.lens[keep]
        return keep

    def append(self, other: "KVCache"):
        """Take `other`'s sequences as rows n.. (waiting requests taking the rows that finished
        ones left, `select` having moved the survivors to the front). They land in the storage
        `select` left behind when it has the room, so the kept rows are not copied."""
        n, m = self.batch, other.batch
        self._check_joins(other, "append")
        bk, bv = self._base
        in_place = bk[0].shape[0] >= n + m and all(a.data_ptr() == b.data_ptr() for a, b in zip(self.k + self.v, bk + bv))
        if not in_place:
            grow = lambda t: _rows_like(t, max(n + m, bk[0].shape[0]))  # noqa: E731
            bk, bv = [grow(t) for t in self.k], [grow(t) for t in self.v]
            for a, b in zip(bk + bv, self.k + self.v):
                a[:n].copy_(b)
            self._base = (bk, bv)
        self.k, self.v = [t[: n + m, :, : self.capacity] for t in bk], [t[: n + m, :, : self.capacity] for t in bv]
        used = min(self._used(other), other.capacity)  # positions past a row's length are masked
        for a, b in zip(self.k + self.v, other.k + other.v):
            a[n:, :, :used].copy_(b[:, :, :used])
        self.lens = torch.cat([self.lens, other.lens.to(self.lens.device)])

    def put_rows(self, rows, other: "KVCache"):
        """Take `other`'s sequences into rows `rows` (host indices) of this cache, in place:
        rows of finished sequences that a draft step still computes (SpecRunner's lazy rows).
        The storage stays, and with it a CUDA graph captured over it. Returns `rows` on the
        cache's device (for subclasses that index more per-row state)."""
        self._check_joins(other, "put_rows")
        idx = to_device(torch.as_tensor(rows, dtype=torch.long).cpu(), self.lens.device, torch.long)
        used = min(self._used(other), other.capacity)
        for a, b in zip(self.k + self.v, other.k + other.v):
            a[idx, :, :used] = b[:, :, :used].to(a.device)
        self.lens[idx] = other.lens.to(self.lens.device)  # in place: a captured step reads this storage
        return idx

    def _check_joins(self, other: "KVCache", what: str):
        """other's rows can join this cache (`append`, `put_rows`)."""
        if other.capacity > self.capacity or len(other.k) != len(self.k):
            raise ValueError(f"{what} needs a cache of the same layers and no larger capacity")

    def _positions_used(self, rows: torch.Tensor) -> int:
        """Positions that `select` copies for host indices `rows`: up to the longest of them, as
        every later one is masked (on w1-long's host cache, capacity 1,298, the longest of 3-8
        moved rows averages 630-880 positions: scripts/profile_kv_select.py). A device cache
        copies them all: reading its lengths would wait for the stream, and its copy is cheap."""
        if self.lens.device.type != "cpu":
            return self.capacity
        return int(self.lens[rows].max()) if len(rows) else 0

    def _used(self, other: "KVCache") -> int:
        """Positions of other's rows that hold tokens (a host cache of GBs is copied only so far)."""
        return int(other.lens.max()) if other.batch else 0

    def part(self, lo: int, hi: int) -> "KVCache":
        """Sequences [lo, hi) as a cache of their own that shares this one's storage (a
        micro-batch of a pass); its lengths are copied, hand them back with `merge`."""
        return self._like([t[lo:hi] for t in self.k], [t[lo:hi] for t in self.v], self.lens[lo:hi].clone())

    def _like(self, k: list, v: list, lens: torch.Tensor) -> "KVCache":
        """A cache of the same kind and settings (a ring's fp8 scale lists shared) over k/v/lens."""
        c = type(self).__new__(type(self))
        c.__dict__.update(self.__dict__)
        c.k, c.v, c.lens, c._pass, c._grouped, c._chunks = k, v, lens, None, {}, None
        c._base = (k, v)
        return c

    def merge(self, lo: int, part: "KVCache"):
        self.lens[lo: lo + part.batch] = part.lens

    def to(self, device) -> "KVCache":
        """A copy on `device` (a draft cache kept in host memory visits the GPU per round)."""
        # copy=True: a real copy even on the same device, so the write-back path is the same
        move = lambda t: t.to(device, non_blocking=True, copy=True)  # noqa: E731
        c = self._like([move(t) for t in self.k], [move(t) for t in self.v], self.lens.to(device, copy=True))
        c.ragged = self.ragged and torch.device(device).type == "cpu"
        return c

    def load(self, other: "KVCache"):
        """Take over the contents of a same-shaped cache (its copy back from the device)."""
        for a, b in zip(self.k + self.v, other.k + other.v):
            a.copy_(b, non_blocking=True)
        self.lens.copy_(other.lens)  # a blocking copy on the same stream: the K/V have landed too

    def pin(self) -> "KVCache":
        """Page-locked host storage, so copies to and from the GPU run asynchronously."""
        self.k = [t.pin_memory() for t in self.k]
        self.v = [t.pin_memory() for t in self.v]
        self._base = (self.k, self.v)
        return self


def _rows_like(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Zeroed storage of `rows` rows shaped and placed like t (page-locked if t is): masked
    positions are still multiplied by a zero weight, so they must not hold NaNs."""
    out = torch.zeros((rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
    return out.pin_memory() if t.is_pinned() else out
