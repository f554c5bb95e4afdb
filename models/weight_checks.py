"""Checks on each tensor read from a checkpoint: float dtype, the shape the config implies, finite.

A checkpoint whose bytes are intact can still be wrong: a tensor saved as integers, a layer
from another model size, NaNs from a diverged fine-tune. Each would otherwise surface as
garbage text hours into a batch; here it is one line naming the file and the tensor, before
any generation. `torch.isfinite(t).all()` costs one read of a layer, which the loader does anyway.
"""

from __future__ import annotations

import torch

from ..errors import CheckpointError


def check_tensor(where, name: str, raw: torch.Tensor, t: torch.Tensor):
    """`raw` as stored has a floating dtype; `t` (it in the compute dtype) is finite everywhere."""
    if not raw.is_floating_point():
        raise CheckpointError(f"{where}: tensor {name} has dtype {str(raw.dtype).replace('torch.', '')}, "
                              f"expected a floating-point dtype")
    if not bool(torch.isfinite(t).all()):
        raise CheckpointError(f"{where}: tensor {name} holds NaN or infinite values")


def layer_shapes(spec) -> dict[str, tuple]:
    h, d, i, e = spec.hidden_size, spec.head_dim, spec.intermediate_size, spec.num_experts
    qd, kd = spec.num_heads * d, spec.num_kv_heads * d
    s = {"ln1": (h,), "ln2": (h,), "q": (qd, h), "k": (kd, h), "v": (kd, h), "o": (h, qd),
         "q_bias": (qd,), "k_bias": (kd,), "v_bias": (kd,), "q_norm": (d,), "k_norm": (d,)}
    if e:
        s |= {"router": (e, h), "w_gate": (e, i, h), "w_up": (e, i, h), "w_down": (e, h, i)}
    else:
        s |= {"gate": (i, h), "up": (i, h), "down": (h, i)}
    return s


def check_layer_shapes(where, spec, j: int, w: dict):
    want = layer_shapes(spec)
    for k, t in w.items():
        if k in want and tuple(t.shape) != want[k]:
            raise CheckpointError(f"{where}: layer {j} tensor {k} has shape {list(t.shape)}, the config implies "
                                  f"{list(want[k])}")


def check_global_shapes(where, spec, g: dict):
    want = {"embed": (spec.vocab_size, spec.hidden_size), "head": (spec.vocab_size, spec.hidden_size),
            "norm": (spec.hidden_size,)}
    for k, t in g.items():
        if k in want and tuple(t.shape) != want[k]:
            raise CheckpointError(f"{where}: {k} has shape {list(t.shape)}, the config implies {list(want[k])}")
