"""Which target layers stay resident on the GPU, once the planner (or `--resident`) says how many.

A streamed layer's weights copy into one of a few slots (plan.num_slots), and a slot is free
again only once its layer has run. With the resident layers first in the pass (the choice
until session 32), the copy engine fills its slots while they run and then waits for the
streamed layers to free them; at the end of the pass it copies back to back, each layer
waiting for its own copy. w1-long's trace (session 32, 3 resident of 8 layers, 2 slots) shows
the copy idle 116 ms of a ~409 ms round. Spread among the streamed layers instead, each
resident layer gives the copy engine one layer's compute to fetch ahead while a slot frees,
so the copy runs through the pass. `scripts/simulate_layer_order.py` replays both orders with
the trace's figures (35 ms a layer's compute, 55 ms a copy, 45 ms drafting, 2 slots): 385 ms
a round with the resident layers first, 325 ms spread.
"""

from __future__ import annotations


def resident_layers(num_layers: int, n: int, disk: int = 0, first: int = 0) -> tuple[int, ...]:
    """n resident layers: the first `first` (a self-draft's layers, `--draft self:N`, which the
    draft runs from the GPU), and the rest spread evenly over the layers after them that are not
    read from disk (the last `disk`, plan.disk_layers): of those m layers, layer
    int((i + 0.5) * m / r) for i < r = n - first, each in the middle of its share of the pass."""
    m = num_layers - disk - first
    if min(n, disk, first) < 0 or first > n or n - first > m:
        raise ValueError(f"cannot keep {n} of {num_layers} layers resident (the first {first} among them) "
                         f"with {disk} read from disk")
    r = n - first
    return tuple(range(first)) + tuple(first + int((i + 0.5) * m / r) for i in range(r))
