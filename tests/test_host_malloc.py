"""plan.keep_freed_memory (host_malloc.py): the CPU worker's process keeps the memory it frees,
so a layer's attention does not fault its temporaries in again page by page. Each check runs in
a fresh Python: the setting lasts a process's life."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# A W4-shaped layer's attention, smaller (48 rows, 64/8 heads, 5 queries over 640 keys), six
# passes of eight layers; the minor faults of the last four passes, per layer.
FAULTS = r"""
import json, sys, torch
from specoffload.actors.cpu_attention import CPUAttention
from specoffload.memory_facts import minor_faults
from specoffload.models.attention import KVCache
from specoffload.sources.constructed import mistral_7b

keep = sys.argv[1] == "1"
w = CPUAttention(mistral_7b().with_layers(2), threads=2, keep_freed_memory=keep)
B, n, keys, L = 48, 5, 640, 8
cache = KVCache(L, B, 8, 128, keys, torch.bfloat16)
q_lens, lens = torch.full((B,), n), torch.full((B,), keys - 2 * n)
out = torch.empty(B * n, 64 * 128, dtype=torch.bfloat16)
q, k, v = (torch.randn(B * n, h, 128, dtype=torch.bfloat16) for h in (64, 8, 8))
faults = []
for p in range(6):
    cache.lens.copy_(lens)
    cache.begin_pass(q_lens, B * n, n)
    f0 = minor_faults()
    for j in range(L):
        cache.attend_layer(j, q, k, v, out=out)
    faults.append((minor_faults() - f0) / L)
    cache._pass = None
print(json.dumps({"kept": w.stats()["worker_keeps_freed_memory"], "faults": sum(faults[2:]) / 4}))
"""


def _run(keep: bool) -> dict:
    r = subprocess.run([sys.executable, "-c", FAULTS, "1" if keep else "0"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and /proc's fault counts")
def test_a_worker_keeping_freed_memory_stops_refaulting_its_temporaries():
    """With the setting, a steady pass's attention takes (almost) no page faults; without it
    the same layers fault their temporaries in again, every pass or every other (here 364-2,524
    faults a layer against 0-60 with it over six runs each on the development machine; 4,057
    against none at W4's 72 rows on the GPU machine)."""
    kept, default = _run(True), _run(False)
    assert kept["kept"] is True and default["kept"] is False
    assert kept["faults"] < 128, kept  # under 512 KiB a layer: stray pages, not the temporaries
    assert default["faults"] > max(2 * kept["faults"], 192), (default, kept)


def test_the_plan_keeps_freed_memory_by_default():
    """On by default (tests/test_doorbell.py runs the actors with it on and off)."""
    from specoffload.placement.plan import Plan

    assert Plan().keep_freed_memory is True
    assert Plan(keep_freed_memory=False).keep_freed_memory is False
