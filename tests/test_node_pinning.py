"""The run's three actors share /dev/shm files, so they are pinned to one Ray node: the
caller's when it can hold the executor, else the first alive node that can."""

from __future__ import annotations

import pytest

from specoffload.errors import ConfigError
from specoffload.placement.node import pick_node

HEAD = {"NodeID": "head", "Alive": True, "Resources": {"CPU": 8.0}}
GPU = {"NodeID": "gpu", "Alive": True, "Resources": {"CPU": 16.0, "GPU": 1.0}}
DEAD_GPU = {"NodeID": "old-gpu", "Alive": False, "Resources": {"CPU": 16.0, "GPU": 1.0}}


def test_the_callers_node_when_it_can_hold_the_executor():
    assert pick_node([GPU, HEAD], "head", need_gpu=False) == "head"
    assert pick_node([HEAD, GPU], "gpu", need_gpu=True) == "gpu"


def test_a_gpu_node_when_the_caller_has_none():
    assert pick_node([DEAD_GPU, HEAD, GPU], "head", need_gpu=True) == "gpu"


def test_no_gpu_node_is_a_clear_error():
    with pytest.raises(ConfigError, match="no alive Ray node has a GPU"):
        pick_node([HEAD, DEAD_GPU], "head", need_gpu=True)
