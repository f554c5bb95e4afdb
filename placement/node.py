"""Which Ray node hosts a run's loader, executor and CPU worker.

The three share memory through files in /dev/shm (the weights, the per-pass mailboxes), so
they must run on one host; left to itself, Ray may place them on different nodes of a
cluster. The node chosen is the caller's own when it can hold the executor (a GPU when the
plan computes on CUDA), else the first alive node that can.
"""

from __future__ import annotations

from ..errors import ConfigError


def pick_node(nodes: list[dict], here: str | None, need_gpu: bool) -> str:
    """nodes: `ray.nodes()`; here: the caller's node id. Returns the node id to pin to."""
    able = [n for n in nodes if n.get("Alive") and (not need_gpu or n.get("Resources", {}).get("GPU", 0) >= 1)]
    if not able:
        raise ConfigError("no alive Ray node has a GPU for the executor (plan.device is 'cuda')" if need_gpu
                          else "no alive Ray node to run on")
    for n in able:
        if n.get("NodeID") == here:
            return here
    return able[0]["NodeID"]
