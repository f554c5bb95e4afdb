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


def from_wire(x) -> torch.Tensor:
    """A host tensor over the object-store array (no copy); models/host_io.to_device moves it."""
    name, arr = x
    with warnings.catch_warnings():  # object-store arrays are read-only; we never write them
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(arr)
    if name is not None:
        t = t.view(getattr(torch, name))
    return t

