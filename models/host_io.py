"""Small host<->device transfers through page-locked memory.

On the GPU executor the host thread must keep issuing work while a weight copy is in flight;
a transfer to or from pageable memory is staged by the driver and blocks that thread, and
every device read is a wait. So small transfers on the hot path go through pinned buffers and
device reads are batched (one per round). On the CPU these are plain conversions.
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(x, device, dtype=None) -> torch.Tensor:
    """A list/numpy array/CPU tensor on `device`, asynchronously when that is a GPU."""
    t = torch.as_tensor(x, dtype=dtype)
    device = torch.device(device)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def to_host(*tensors: torch.Tensor) -> list[np.ndarray]:
    """Device tensors as numpy arrays, with one wait for all of them."""
    if not tensors or tensors[0].device.type != "cuda":
        return [t.numpy() if t.device.type == "cpu" else t.cpu().numpy() for t in tensors]
    hosts = []
    for t in tensors:
        h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        h.copy_(t, non_blocking=True)
        hosts.append(h)
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return [h.numpy() for h in hosts]
