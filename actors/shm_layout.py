"""Weights in shared memory: one file per layer under /dev/shm, laid out flat.

The I/O loader writes each file once at start; the GPU executor maps the same pages
(`torch.from_file(shared=True)`), registers them with CUDA (page-locked, so copies run at
full PCIe speed) and copies a whole layer with one memcpy into a GPU slot laid out the same.
`register` and `SharedBuffer` serve the other /dev/shm files the GPU copies to and from (a
pass's mailboxes, a prefill's K/V ring) the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

ALIGN = 256


@dataclass(frozen=True)
class TensorEntry:
    name: str
    offset: int
    shape: tuple
    dtype: str

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=getattr(torch, self.dtype)).element_size()
        for s in self.shape:
            n *= s
        return n


def layout(tensors: dict[str, torch.Tensor]) -> tuple[list[TensorEntry], int]:
    entries, off = [], 0
    for name, t in tensors.items():
        entries.append(TensorEntry(name, off, tuple(t.shape), str(t.dtype).replace("torch.", "")))
        off += (t.numel() * t.element_size() + ALIGN - 1) // ALIGN * ALIGN
    return entries, off


def write_file(path: Path, tensors: dict[str, torch.Tensor]) -> list[TensorEntry]:
    """Write tensors flat into `path` (a /dev/shm file); returns the entries to map them."""
    entries, total = layout(tensors)
    tmp = Path(str(path) + ".tmp")
    # write(), not a copy into a mapping of the file: on tmpfs the mapping faults in one page
    # at a time (1.4 GB/s with one thread on the dev machine, write() 2.4 GB/s).
    with open(tmp, "wb", buffering=0) as f:
        for e in entries:
            f.seek(e.offset)  # the alignment gap before it stays a hole (reads as zeros)
            f.write(memoryview(tensors[e.name].contiguous().view(-1).view(torch.uint8).numpy()))
        f.truncate(max(total, 1))
    os.replace(tmp, path)
    return entries


def map_file(path: Path, entries: list[TensorEntry]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    total = max((e.offset + e.nbytes for e in entries), default=1)
    buf = torch.from_file(str(path), shared=True, size=total, dtype=torch.uint8)
    return buf, views(buf, entries)


def views(buf: torch.Tensor, entries: list[TensorEntry]) -> dict[str, torch.Tensor]:
    return {
        e.name: buf[e.offset : e.offset + e.nbytes].view(getattr(torch, e.dtype)).view(e.shape)
        for e in entries
    }


def register(buf: torch.Tensor, what: str):
    """Page-lock a shared-memory mapping in place so the GPU can DMA to and from it."""
    rc = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel(), 0)
    if int(rc) != 0:
        raise RuntimeError(f"cudaHostRegister failed ({rc}) for {what}")


class _CudaView:
    """What `torch.as_tensor` reads a CUDA pointer from (__cuda_array_interface__)."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3}


def device_view(t: torch.Tensor, device) -> torch.Tensor:
    """A CUDA tensor over the page-locked host tensor t's memory, which kernels read across
    PCIe as they run, not through a copy engine. Needs t registered (`register`) on a device
    that addresses registered memory by its host pointer (unified addressing on 64-bit Linux,
    every GPU this engine targets)."""
    raw = torch.as_tensor(_CudaView(t.data_ptr(), t.numel() * t.element_size()), device=device)
    return raw.view(t.dtype).view(t.shape)


class SharedBuffer:
    """A /dev/shm file mapped as bytes, page-locked in place where the GPU copies to and from
    it: what a pass's mailbox (actors/mailbox.py) and a prefill's K/V ring (actors/kv_ring.py)
    have in common."""

    what = "shared buffer"  # names it in errors, with its path

    def _map(self, path, size: int, create: bool, too_small: str):
        self.path = str(path)
        if not create and os.path.getsize(self.path) < size:
            raise RuntimeError(too_small)
        self.buf = torch.from_file(self.path, shared=True, size=size, dtype=torch.uint8)
        self.registered = False

    def register(self):
        register(self.buf, f"{self.what} {self.path}")
        self.registered = True

    def close(self, unlink: bool = False):
        if self.registered:
            torch.cuda.cudart().cudaHostUnregister(self.buf.data_ptr())
            self.registered = False
        self.buf = None
        if unlink:
            Path(self.path).unlink(missing_ok=True)
