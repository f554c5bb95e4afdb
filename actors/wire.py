"""Tensors across actors: numpy views in Ray's object store, never pickled torch tensors.

numpy has no bfloat16, so 16-bit floats travel as int16 bit patterns with the dtype name
beside them (`ray.put` of a torch tensor costs 10x the same bytes as numpy).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

_BITS = {torch.bfloat16: np.int16, torch.float16: np.int16}


def to_wire(t: torch.Tensor):
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dtype in _BITS:
        return (str(t.dtype).replace("torch.", ""), t.view(torch.int16).numpy())
    return (None, t.numpy())


def from_wire(x, device="cpu") -> torch.Tensor:
    name, arr = x
    with warnings.catch_warnings():  # object-store arrays are read-only; we never write them
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(arr)
    if name is not None:
        t = t.view(getattr(torch, name))
    return t.to(device, non_blocking=True) if str(device) != "cpu" else t


class PinnedStager:
    """Device-to-host (and host-to-device) copies through reused page-locked buffers: DMA at
    the full PCIe rate instead of the driver's pageable path. One buffer per name (q, k, v, ...), grown as
    needed; the numpy views it returns stay valid until the same name is staged again, which
    on a sequential actor is after Ray has stored the method's return value."""

    def __init__(self):
        self.bufs: dict[str, torch.Tensor] = {}
        self.inbound: dict[str, list] = {}

    def to_wire(self, named: dict[str, torch.Tensor]) -> dict:
        if not named or next(iter(named.values())).device.type != "cuda":
            return {k: to_wire(t) for k, t in named.items()}
        out = {}
        for name, t in named.items():
            t = t.detach().contiguous()
            n = t.numel() * t.element_size()
            buf = self.bufs.get(name)
            if buf is None or buf.numel() < n:
                buf = self.bufs[name] = torch.empty(max(n, 1 << 20), dtype=torch.uint8, pin_memory=True)
            h = buf[:n].view(t.dtype).view(t.shape)
            h.copy_(t, non_blocking=True)
            out[name] = h
        torch.cuda.current_stream().synchronize()  # one wait for all of them
        return {k: to_wire(h) for k, h in out.items()}

    def from_wire(self, x, device, name: str = "in") -> torch.Tensor:
        """Host-to-device through a page-locked buffer (two per name, reused once the copy
        that read one is done), so the copy is plain DMA on the compute stream rather than
        the driver's pageable path that blocks the executor's thread."""
        t = from_wire(x)
        if torch.device(device).type != "cuda":
            return t
        n = t.numel() * t.element_size()
        ring = self.inbound.setdefault(name, [[None, None], [None, None]])  # two (buffer, event)
        slot = ring[0]
        ring.reverse()
        buf, ev = slot
        if ev is not None:
            ev.synchronize()  # the copy that last read this buffer is done
        if buf is None or buf.numel() < n:
            buf = slot[0] = torch.empty(max(n, 1 << 20), dtype=torch.uint8, pin_memory=True)
        h = buf[:n].view(t.dtype).view(t.shape)
        h.copy_(t)
        out = h.to(device, non_blocking=True)
        slot[1] = torch.cuda.Event()
        slot[1].record()
        return out
