"""The draft's one-token steps replayed as CUDA graphs propose exactly what eager steps do.

The graph reads the ring cache through fixed addresses, so what it relies on is tested on
every machine (lengths rolled back in place, the one-token packing); the replay itself needs
a GPU (run on the device machine: `pytest tests/test_draft_graph.py`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_reference import PROMPTS, hf_greedy
from specoffload.configs.run_config import RunConfig
from specoffload.configs.sampling_params import SamplingParams
from specoffload.models.attention import KVCache, pack_index
from specoffload.models.checkpoint import Checkpoint
from specoffload.models.resident import ResidentModel
from specoffload.scheduler.generator import Generator
from specoffload.scheduler.reference_backend import ReferenceBackend
from specoffload.scheduler.request import Request
from specoffload.speculation.runner import SpecRunner
from specoffload.speculation.sampler import SamplingTensors
import gpu  # noqa: E402  (tests/ is on sys.path: conftest.py)

cuda_only = gpu.cuda_only("CUDA graphs need a GPU")


def test_rollback_keeps_the_length_storage():
    c = KVCache(2, 3, 1, 4, 16, torch.float32)
    c.lens += torch.tensor([5, 6, 7])
    ptr = c.lens.data_ptr()
    c.truncate(torch.tensor([4, 6, 5]))
    assert c.lens.tolist() == [4, 6, 5] and c.lens.data_ptr() == ptr
    with pytest.raises(RuntimeError, match="cannot extend"):
        c.truncate(torch.tensor([9, 6, 5]))


def test_one_token_packing_needs_no_scan():
    ones = torch.ones(5, dtype=torch.long)
    fast, general = pack_index(ones, 5, n_q=1), pack_index(ones, 5)
    assert all(torch.equal(a, b) for a, b in zip(fast, general))
    ragged = torch.tensor([2, 1, 2])  # n_q != 1: the general scan
    assert pack_index(ragged, 5, n_q=2)[1].tolist() == [0, 1, 0, 0, 1]


def _rounds(runner, draft, prompts, k, seed=0):
    """Proposals of a few rounds with random target verdicts, a sequence leaving mid-way."""
    B, V = len(prompts), draft.spec.vocab_size
    g = torch.Generator().manual_seed(seed)
    samp = SamplingTensors(np.zeros(B, np.float32), np.zeros(B, np.int64), np.ones(B, np.float32))
    runner.start(0, samp, prompts, 64)
    dev = draft.device
    runner.finish(0, torch.randn(1, 1, V, generator=g).expand(B, 1, V).to(dev), 0, None,
                  np.zeros(B, np.float32), first=True)
    out = []
    for r in range(5):
        n = runner.batches[0].last.shape[0]
        u = np.zeros((n, k), np.float32)
        runner.propose(0, k, u)
        props = runner.batches[0].proposals.clone()
        out.append(props.cpu())
        # The target accepts a varying prefix of the proposals: logits whose argmax is the
        # proposal for the first `a` positions, a fresh token after.
        a = torch.randint(0, k + 1, (n,), generator=g)
        logits = torch.randn(n, k + 1, V, generator=g).to(dev)
        for b in range(n):
            for i in range(int(a[b])):
                logits[b, i, props[b, i]] = 100.0
        runner.finish(0, logits, k, None, u[:, :1])
        if r == 2:
            runner.keep(0, np.array([0, 2] + list(range(3, n)), dtype=np.int64))  # row 1 finished
    return out


def test_a_failed_capture_falls_back_to_eager_steps(tiny_dir, monkeypatch):
    """Where capture fails (here: a CPU build, which has no graphs) the step that tried it still
    returns its eager result, a warning says so, and later steps run eagerly: same proposals."""
    import specoffload.speculation.runner as bs

    draft = ResidentModel.from_source(Checkpoint(tiny_dir("llama", seed=1, num_hidden_layers=2)))
    prompts = [p + [5] * (i % 3) for i, p in enumerate(PROMPTS)]
    want = _rounds(SpecRunner(draft, "cpu", window=4, sinks=2, graphs=False), draft, prompts, k=4)
    monkeypatch.setattr(bs, "graphable", lambda model, cache: True)
    runner = SpecRunner(draft, "cpu", window=4, sinks=2)
    with pytest.warns(UserWarning, match="draft steps run eagerly: CUDA graph capture failed"):
        got = _rounds(runner, draft, prompts, k=4)
    assert not runner.graphs_enabled and runner.graph_steps == 0  # tried once, never graphed
    assert all(torch.equal(w, o) for w, o in zip(want, got))


def test_a_capture_out_of_memory_steps_eagerly_until_the_rows_change(tiny_dir, monkeypatch):
    """A capture that runs out of memory (W1 run 7, under the GPU cap) costs only that cache
    state its graph: one warning, graphs stay on, and the next cache state (rows left the
    batch) tries again. Proposals are the eager ones throughout."""
    import specoffload.speculation.runner as bs
    from specoffload.speculation.draft_graph import GraphedDraftStep

    draft = ResidentModel.from_source(Checkpoint(tiny_dir("llama", seed=1, num_hidden_layers=2)))
    prompts = [p + [5] * (i % 3) for i, p in enumerate(PROMPTS)]
    want = _rounds(SpecRunner(draft, "cpu", window=4, sinks=2, graphs=False), draft, prompts, k=4)
    attempts = []

    def no_memory(self):
        attempts.append(self.cache.batch)
        raise torch.OutOfMemoryError("CUDA out of memory (test)")

    monkeypatch.setattr(bs, "graphable", lambda model, cache: True)
    monkeypatch.setattr(GraphedDraftStep, "_capture", no_memory)
    runner = SpecRunner(draft, "cpu", window=4, sinks=2, lazy_rows=False)  # a leaving row changes the cache
    with pytest.warns(UserWarning, match="ran out of memory in CUDA graph capture") as rec:
        got = _rounds(runner, draft, prompts, k=4)
    assert len(rec) == 1 and runner.graphs_enabled and runner.graph_steps == 0
    B = len(prompts)
    assert attempts == [B, B - 1]  # once per cache state: before and after a row left
    assert all(torch.equal(w, o) for w, o in zip(want, got))


def _verdict_rounds(runner, prompts, k, greedy, leave, rounds=6):
    """`rounds` rounds of a batch started on `runner`, each verified by random target logits that
    accept a random prefix of the proposals; after round r the rows leave[r] stay. Yields
    (proposals, draft probabilities or None, accepted counts) after each round's verification
    and rows leaving, the runner's state then open to the caller."""
    B, V = len(prompts), runner.draft.spec.vocab_size
    g = torch.Generator().manual_seed(0)
    temp = np.full(B, 0.0 if greedy else 0.9, np.float32)
    runner.start(0, SamplingTensors(temp, np.zeros(B, np.int64), np.ones(B, np.float32)), prompts, 64)
    runner.finish(0, torch.randn(B, 1, V, generator=g), 0, None, np.full(B, 0.5, np.float32), first=True)
    for r in range(rounds):
        n = runner.batches[0].last.shape[0]
        u = torch.rand(n, k + 1, generator=g).numpy()
        runner.propose(0, k, u[:, :k])
        st = runner.batches[0]
        props, q = st.proposals.clone(), None if st.q is None else st.q.clone()
        a = torch.randint(0, k + 1, (n,), generator=g)
        logits = torch.randn(n, k + 1, V, generator=g)
        for b in range(n):
            for i in range(int(a[b])):
                logits[b, i, props[b, i]] = 100.0
        runner.finish(0, logits, k, u[:, :k], u[:, k])
        if r in leave:
            runner.keep(0, np.array(leave[r], dtype=np.int64))
        yield props, q, a


@pytest.mark.parametrize("greedy", [True, False])
def test_finished_rows_stay_in_the_draft_cache_until_half_are_gone(tiny_dir, greedy):
    """With lazy rows the draft keeps computing finished sequences' rows (so a captured step
    keeps serving) and drops them once half the rows are finished: the live sequences'
    proposals and draft probabilities are those of a cache that drops rows at once."""
    draft = ResidentModel.from_source(Checkpoint(tiny_dir("llama", seed=1, num_hidden_layers=2)))
    prompts = [p + [5] * (i % 3) for i, p in enumerate(PROMPTS)] * 2
    B, k = len(prompts), 3
    leave = {1: [0, 2] + list(range(3, B)), 3: [0, 1, 3], 4: [0, 2]}  # after round r: rows kept

    def run(lazy: bool):
        runner = SpecRunner(draft, "cpu", window=4, sinks=2, graphs=False, lazy_rows=lazy)
        out, sizes = [], []
        for props, q, _ in _verdict_rounds(runner, prompts, k, greedy, leave):
            out.append((props, q))
            sizes.append(runner.batches[0].draft_cache.batch)
        return out, sizes

    (want, eager_sizes), (got, lazy_sizes) = run(False), run(True)
    assert eager_sizes == [B, B - 1, B - 1, 3, 2, 2]
    assert lazy_sizes == [B, B, B, 3, 3, 3]  # 3 of 8 live: compacted; then 2 of 3 stay lazily
    for (wp, wq), (gp, gq) in zip(want, got):
        assert torch.equal(wp, gp)
        assert (wq is None) == greedy and (greedy or torch.allclose(wq, gq, atol=1e-6))


@pytest.mark.parametrize("greedy", [True, False])
@pytest.mark.parametrize("lazy", [False, True])
def test_a_draft_that_feeds_its_last_proposal_proposes_the_same(tiny_dir, greedy, lazy):
    """With `feed_last` the draft runs d_k through one more step each round, so every sequence
    starts the next round with one pending token (the step a graph replays) instead of two
    after a fully accepted round. Proposals and draft probabilities are the same, rows
    leaving mid-run included; what the draft has taken in (cache length plus pending tokens)
    is the same after every round, and its pending tokens are always one."""
    draft = ResidentModel.from_source(Checkpoint(tiny_dir("llama", seed=1, num_hidden_layers=2)))
    prompts = [p + [5] * (i % 3) for i, p in enumerate(PROMPTS)] * 2
    B, k = len(prompts), 3
    leave = {1: [0, 2] + list(range(3, B)), 3: [0, 1, 3, 4], 4: [0, 2, 3]}

    def run(feed: bool):
        runner = SpecRunner(draft, "cpu", window=4, sinks=2, graphs=False, lazy_rows=lazy, feed_last=feed)
        out, taken, full = [], [], 0
        for props, q, a in _verdict_rounds(runner, prompts, k, greedy, leave):
            out.append((props, q))
            full += int((a == k).sum())
            st = runner.batches[0]
            rows = np.arange(len(st.pending)) if st.rows is None else st.rows
            lens = st.draft_cache.lens[torch.as_tensor(rows)].tolist()
            taken.append([ln + len(p) for ln, p in zip(lens, st.pending)])
            if feed:
                assert all(len(p) == 1 for p in st.pending)
        return out, taken, full

    (want, want_taken, full), (got, got_taken, _) = run(False), run(True)
    assert full > 0  # some rounds accepted every proposal: the case feeding d_k changes
    assert got_taken == want_taken
    for (wp, wq), (gp, gq) in zip(want, got):
        assert torch.equal(wp, gp)
        assert (wq is None) == greedy and (greedy or torch.allclose(wq, gq, atol=1e-5))


def test_a_draft_that_feeds_its_last_proposal_stays_lossless(tiny_dir):
    d = tiny_dir("llama")
    want = hf_greedy(d, PROMPTS, 24)
    tgt = ResidentModel.from_source(Checkpoint(d))
    reqs = [Request(i, p, SamplingParams(max_tokens=24, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
    backend = ReferenceBackend(tgt, tgt, draft_window=4, draft_sinks=2)
    backend.spec.feed_last = True
    stats = Generator(backend, RunConfig(schedule="single", k=4, batch_size=4)).run(reqs)
    assert [r.out for r in reqs] == want
    assert 0 < stats.accepted < stats.proposed


@cuda_only
@pytest.mark.parametrize("fp8,sinks", [(False, 0), (True, 2)])
def test_graphed_draft_proposes_what_eager_steps_do(tiny_dir, fp8, sinks):
    draft = ResidentModel.from_source(Checkpoint(tiny_dir("llama", seed=1, num_hidden_layers=2)), "cuda")
    prompts = [p + [5] * (i % 3) for i, p in enumerate(PROMPTS)] * 2
    graphed = SpecRunner(draft, "cuda", window=4, fp8=fp8, sinks=sinks)
    eager = SpecRunner(draft, "cuda", window=4, fp8=fp8, sinks=sinks, graphs=False)
    want = _rounds(eager, draft, prompts, k=5)
    got = _rounds(graphed, draft, prompts, k=5)
    assert eager.graph_steps == 0 and graphed.graph_steps >= 5 * 4
    for w, o in zip(want, got):
        assert torch.equal(w, o)


@cuda_only
def test_graphed_draft_on_cuda_is_lossless(tiny_dir):
    d = tiny_dir("llama")
    want = hf_greedy(d, PROMPTS, 24)
    tgt = ResidentModel.from_source(Checkpoint(d), "cuda")
    reqs = [Request(i, p, SamplingParams(max_tokens=24, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
    backend = ReferenceBackend(tgt, tgt, draft_window=4, draft_sinks=2)
    Generator(backend, RunConfig(schedule="single", k=4, batch_size=4)).run(reqs)
    assert backend.spec.graph_steps > 0
    assert [r.out for r in reqs] == want
