"""Small host<->device transfers through page-locked memory.

On the GPU executor the host thread must keep issuing work while a weight copy is in flight;
a transfer to or from pageable memory is staged by the driver and blocks that thread, and
every device read is a wait. So small transfers on the hot path go through pinned buffers and
device reads are batched (one per round). On the CPU these are plain conversions.
"""

from __future__ import annotations

import numpy as np
import torch


def host_tensor(x, dtype=None) -> torch.Tensor:
    """torch.as_tensor for small arguments that may have come through Ray: its numpy arrays
    (the rows a batch keeps, the accepted counts) are read-only views of the object store,
    which a tensor must not share (torch warns, and writing one is undefined): those are
    copied."""
    if isinstance(x, np.ndarray) and not x.flags.writeable:
        x = x.copy()
    return torch.as_tensor(x, dtype=dtype)


def to_device(x, device, dtype=None) -> torch.Tensor:
    """A list/numpy array/CPU tensor on `device`, asynchronously when that is a GPU."""
    t = host_tensor(x, dtype)
    device = torch.device(device)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def packed(seqs: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as one packed tensor and their lengths, both moved to `device`."""
    return (to_device([t for s in seqs for t in s], device, torch.long),
            to_device([len(s) for s in seqs], device, torch.long))


def to_host(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Device tensors as host tensors (page-locked when they come from a GPU), with one wait
    for all of them. Pinned blocks come from torch's caching host allocator, so they are
    reused without being reallocated, and stay alive while anything (a numpy view) uses them."""
    if not tensors or tensors[0].device.type != "cuda":
        return [t.detach().cpu() for t in tensors]
    hosts = []
    for t in tensors:
        h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        h.copy_(t, non_blocking=True)
        hosts.append(h)
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return hosts
