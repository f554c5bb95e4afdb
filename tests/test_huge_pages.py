"""plan.kv_huge_pages: the CPU worker's host KV cache asked for in 2 MiB pages
(models/huge_pages.py). The memory is zeroed either way and attends the same; where the kernel
has transparent huge pages, the advice is on the memory's mapping ("hg" in /proc/self/smaps'
VmFlags). Whether the kernel then finds free huge pages depends on how fragmented memory is
(in a CI run after hundreds of tests it found none), so the pages themselves are not asserted."""

from __future__ import annotations

import sys

import pytest
import torch

from specoffload.actors.cpu_attention import CPUAttention
from specoffload.memory_facts import thp_modes
from specoffload.models import huge_pages
from specoffload.models.attention import KVCache
from specoffload.sources.constructed import mistral_7b

THP = sys.platform.startswith("linux") and bool(thp_modes()) and thp_modes()["enabled"] != "never"


def _advised(t: torch.Tensor) -> bool:
    """Whether the mapping holding t's first whole 2 MiB page carries the huge page advice."""
    addr = -(-t.data_ptr() // huge_pages.HUGE_PAGE) * huge_pages.HUGE_PAGE
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and line.startswith("VmFlags:"):
                return "hg" in line.split()[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


def _count_advice(monkeypatch) -> list:
    """The tensors advised from now on. Memory made without advice is checked by this, not by its
    mapping's flags: in one CI run, after hundreds of tests, a worker cache made without advice sat
    in a mapping that carried it (an allocator can hand out a range an earlier advised tensor had)."""
    calls, real = [], huge_pages.advise

    def advise(t):
        calls.append(t.data_ptr())
        return real(t)

    monkeypatch.setattr(huge_pages, "advise", advise)
    return calls


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc")
def test_advised_memory_is_zeroed_and_its_mapping_carries_the_advice(monkeypatch):
    t = huge_pages.zeros((64, 1 << 20), torch.bfloat16, huge=True)  # 128 MiB
    advised = _count_advice(monkeypatch)
    plain = huge_pages.zeros((64, 1 << 20), torch.bfloat16)
    assert t.shape == (64, 1 << 20) and not t.any() and not plain.any()
    assert _advised(t) is THP and advised == []
    # under a page: asked, with nothing to advise
    assert not huge_pages.zeros((3, 5), torch.float32, huge=True).any() and len(advised) == 1
    assert huge_pages.advise(torch.empty(3, 5)) == 0
    if THP:  # every whole 2 MiB page inside the tensor: all but its two ends
        assert huge_pages.advise(torch.empty(64, 1 << 20, dtype=torch.bfloat16)) >= (128 << 20) - 2 * huge_pages.HUGE_PAGE


def test_a_cache_in_huge_pages_attends_as_the_plain_one():
    torch.manual_seed(0)
    q_lens = torch.tensor([3, 1])
    q, k, v = torch.randn(4, 4, 4), torch.randn(4, 2, 4), torch.randn(4, 2, 4)
    outs = []
    for huge in (False, True):
        c = KVCache(2, 2, 2, 4, 8, torch.float32, huge_pages=huge)
        c.begin_pass(q_lens)
        outs.append([c.attend_layer(j, q, k, v) for j in range(2)])
        c.advance()
    assert all(torch.equal(a, b) for a, b in zip(*outs))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc")
def test_the_worker_switch_applies_to_caches_made_after_it(monkeypatch):
    """CPUAttention.set_huge_pages (the coordinator's set_switch("kv_huge_pages")): a cache made
    after it is on is advised and zeroed; one made after it is off is not advised; the worker
    reports its memory in huge pages once a cache of 1 GiB or more is made."""
    w = CPUAttention(mistral_7b().with_layers(2))  # 8 KiB of K/V a token
    assert w.set_huge_pages(True) is True and w.huge_pages
    w.start(1, [4] * 64, capacity=2048, prefill_batch=4)  # 64 rows x 2,048 positions: 1 GiB
    assert _advised(w.caches[1].k[0]) is THP and _advised(w.caches[1].v[1]) is THP
    assert not w.caches[1].k[0].any()
    assert isinstance(w.stats()["worker_anon_huge_at_start"], int)
    assert w.set_huge_pages(False) is False
    advised = _count_advice(monkeypatch)
    w.start(2, [4] * 8, capacity=2048, prefill_batch=4)
    assert advised == [] and not w.caches[2].k[0].any()
