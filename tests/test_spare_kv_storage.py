"""The CPU worker makes a joining batch's host KV cache in the storage a freed batch left
(CPUAttention._keep_spare) instead of new zeroed memory, and what that storage still holds
never reaches attention: every position past a row's length is masked."""

from __future__ import annotations

import torch

from specoffload.actors.cpu_attention import SPARE_BYTES, CPUAttention
from specoffload.models.attention import KVCache
from specoffload.sources.constructed import mistral_7b


def test_stale_storage_attends_as_fresh_zeros():
    torch.manual_seed(0)
    fresh = KVCache(1, 2, 2, 4, 8, torch.float32)
    stale = ([torch.full((3, 2, 8, 4), 1e4)], [torch.full((3, 2, 8, 4), -3e3)])  # a taller batch's
    reused = KVCache(1, 2, 2, 4, 8, torch.float32, storage=stale)
    assert reused.k[0].data_ptr() == stale[0][0].data_ptr() and reused.batch == 2
    q_lens = torch.tensor([3, 1])
    q, k, v = torch.randn(4, 4, 4), torch.randn(4, 2, 4), torch.randn(4, 2, 4)
    outs = []
    for c in (fresh, reused):
        c.begin_pass(q_lens)
        outs.append(c.attend_layer(0, q, k, v))
        c.advance()
    assert torch.equal(outs[0], outs[1])
    # a storage of another shape is not taken
    other = KVCache(1, 2, 2, 4, 8, torch.float32, storage=([torch.zeros(3, 2, 9, 4)], [torch.zeros(3, 2, 9, 4)]))
    assert other.k[0].data_ptr() != stale[0][0].data_ptr()


def test_a_joining_batch_takes_the_storage_the_last_one_left():
    w = CPUAttention(mistral_7b().with_layers(2))
    w.start(1, [5, 6, 7, 8], capacity=16, prefill_batch=4)
    w.start(2, [3, 4], capacity=16, prefill_batch=4)  # rows joining batch 1: a batch until merged
    joined = w.caches[2].k[0].data_ptr()
    w.merge(1, 2)
    assert 2 not in w.caches and w.caches[1].batch == 6
    w.start(3, [2], capacity=12, prefill_batch=4)  # fewer rows and positions: a corner of the kept storage
    assert w.caches[3].k[0].data_ptr() == joined and w.caches[3].lens.tolist() == [0]
    assert w.caches[3].k[0].shape[0] == 1 and w.caches[3].k[0].shape[2] == w.caches[3].capacity == 12
    w.start(4, [2, 2], capacity=16, prefill_batch=4)  # kept storage taken already: new memory
    assert w.caches[4].k[0].data_ptr() != joined
    st = w.stats()
    assert st["worker_spare_reused"] == 1 and w.start_s > 0 and w.merge_s > 0
    assert st["worker_start_s"] == round(w.start_s, 3) and st["worker_merge_s"] == round(w.merge_s, 3)
    w.free(3), w.free(4)  # two kept (a joining batch starts before the one before it merges)...
    w.start(5, [1], capacity=16, prefill_batch=4)  # ...and the smallest that fits is taken
    assert w.caches[5].k[0].data_ptr() == joined
    w.start(6, [1, 1], capacity=16, prefill_batch=4)
    assert w.stats()["worker_spare_reused"] == 3 and not w._spare
    w.start(7, [1], capacity=17, prefill_batch=4)  # more positions than any kept: new memory
    assert w.stats()["worker_spare_reused"] == 3
    w.free(1)  # within SPARE_BYTES: kept for the next batch
    assert len(w._spare) == 1 and w._spare[0][0][0].shape[0] >= 6
    assert sum(t.numel() * t.element_size() for t in w._spare[0][0] + w._spare[0][1]) <= SPARE_BYTES


def test_the_worker_reports_its_page_faults_and_huge_pages_for_a_large_cache():
    """stats() counts the worker's minor page faults (bench subtracts two of them: a run's) and,
    once a new cache of 1 GiB or more is made, how much of its memory sits in huge pages then
    (memory_facts; None until such a cache, or off Linux)."""
    import sys

    w = CPUAttention(mistral_7b().with_layers(2))  # 8 KiB of K/V a token
    w.start(1, [4], capacity=16, prefill_batch=4)
    before = w.stats()
    assert before["worker_anon_huge_at_start"] is None  # a small cache is not looked at
    w.start(2, [4] * 64, capacity=2048, prefill_batch=4)  # 64 rows x 2,048 positions: 1 GiB
    st = w.stats()
    # zeroing 1 GiB touches every page: at least one fault a 2 MiB page, more in 4 KiB ones
    assert st["worker_minor_faults"] - before["worker_minor_faults"] >= (1 << 30) // (2 << 20)
    if sys.platform.startswith("linux"):
        assert isinstance(st["worker_anon_huge_at_start"], int) and st["worker_anon_huge_at_start"] >= 0
