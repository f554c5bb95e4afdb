"""plan.kv_huge_pages: the CPU worker's host KV cache asked for in 2 MiB pages
(models/huge_pages.py). The memory is zeroed either way and attends the same; where the kernel's
transparent huge pages are "always" or "madvise", the advised memory comes in huge pages."""

from __future__ import annotations

import torch

from specoffload.actors.cpu_attention import CPUAttention
from specoffload.memory_facts import anon_huge_bytes, thp_modes
from specoffload.models import huge_pages
from specoffload.models.attention import KVCache
from specoffload.sources.constructed import mistral_7b


def _thp_allows_advice() -> bool:
    modes = thp_modes()
    return bool(modes) and modes["enabled"] in ("always", "madvise")


def test_advised_memory_is_zeroed_and_comes_in_huge_pages_where_the_kernel_allows():
    before = anon_huge_bytes()
    t = huge_pages.zeros((64, 1 << 20), torch.bfloat16, huge=True)  # 128 MiB
    assert t.shape == (64, 1 << 20) and not t.any()
    if _thp_allows_advice():
        assert anon_huge_bytes() - before >= 64 << 20  # most of it: the ends short of a 2 MiB page are not
    assert not huge_pages.zeros((3, 5), torch.float32, huge=True).any()  # under a page: nothing to advise
    assert huge_pages.advise(torch.empty(3, 5)) == 0


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


def test_the_worker_switch_applies_to_caches_made_after_it():
    """CPUAttention.set_huge_pages (the coordinator's set_switch("kv_huge_pages")): a 1 GiB
    cache made after it is on lands in huge pages where the kernel allows (the worker reports
    them once such a cache is made), zeroed."""
    w = CPUAttention(mistral_7b().with_layers(2))  # 8 KiB of K/V a token
    assert w.set_huge_pages(True) is True and w.huge_pages
    w.start(1, [4] * 64, capacity=2048, prefill_batch=4)  # 64 rows x 2,048 positions: 1 GiB
    if _thp_allows_advice():
        assert w.stats()["worker_anon_huge_at_start"] >= 512 << 20
    assert not w.caches[1].k[0].any()
    assert w.set_huge_pages(False) is False
