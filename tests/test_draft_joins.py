"""Rows joining a running batch, on the draft's side.

They have the draft read their prompts beside the batch's next draft round and pass
(`SpecRunner.prime_beside`: a thread, and on CUDA a stream, of their own): the draft state they
join with, and so every proposal after, is what priming them in line makes; what the priming
raises is the error of every later use of those rows; a batch dropped mid-priming waits for it.

They take the rows that finished sequences left in a lazily kept draft cache (`put_rows`), so
the cache keeps its storage and a captured draft step keeps serving: proposals are those of a
cache that drops finished rows and appends joining ones.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from hf_reference import PROMPTS
from specoffload.configs.sampling_params import SamplingParams
from specoffload.models.checkpoint import Checkpoint
from specoffload.models.resident import ResidentModel
from specoffload.speculation import runner as runner_module
from specoffload.speculation.runner import SpecRunner
from specoffload.speculation.sampler import SamplingTensors
import gpu  # noqa: E402  (tests/ is on sys.path: conftest.py)

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not gpu.HAS_CUDA, reason="the priming's own stream is a CUDA stream")])]


def _slow_priming(monkeypatch, seconds: float, fail: bool = False):
    """Priming that starts `seconds` late (or raises) and records the thread it ran on."""
    real, threads = runner_module.prime, []

    def slow(*args, **kw):
        threads.append(threading.current_thread().name)
        time.sleep(seconds)
        if fail:
            raise RuntimeError("injected priming failure")
        return real(*args, **kw)

    monkeypatch.setattr(runner_module, "prime", slow)
    return threads


def _samp(n, greedy):
    return SamplingTensors(np.full(n, 0.0 if greedy else 0.9, np.float32), np.zeros(n, np.int64), np.ones(n, np.float32))


def _first_tokens(runner, bid: int, n: int, g):
    """Batch bid's first tokens, from random prefill logits (the draft has seen the prompts)."""
    logits = torch.randn(n, 1, runner.draft.spec.vocab_size, generator=g).to(runner.device)
    runner.finish(bid, logits, 0, None, np.full(n, 0.5, np.float32), first=True)


def _round(runner, k: int, g):
    """One round of batch 0: its proposals, then random target verdicts that accept a random
    prefix of them. Returns the proposals and draft probabilities (None when greedy), on the host."""
    n, V = runner.batches[0].last.shape[0], runner.draft.spec.vocab_size
    u = torch.rand(n, k + 1, generator=g).numpy()
    runner.propose(0, k, u[:, :k])
    st = runner.batches[0]
    props, q = st.proposals.clone(), None if st.q is None else st.q.cpu()
    a = torch.randint(0, k + 1, (n,), generator=g)
    logits = torch.randn(n, k + 1, V, generator=g).to(runner.device)
    for b in range(n):
        for i in range(int(a[b])):
            logits[b, i, props[b, i]] = 100.0
    runner.finish(0, logits, k, u[:, :k], u[:, k])
    return props.cpu(), q


def _job(runner, prompts, k, greedy, rounds=5, join_after=1):
    """Batch 0 takes the first half of `prompts`; after round `join_after` the rest join it as
    batch 1, started beside (or not) while batch 0 drafts its next round. Returns each round's
    proposals and draft probabilities, and how long batch 1's start took."""
    half, g = len(prompts) // 2, torch.Generator().manual_seed(0)
    runner.start(0, _samp(half, greedy), prompts[:half], 64)
    _first_tokens(runner, 0, half, g)
    out, start_s = [], None
    for r in range(rounds):
        if r == join_after + 1:  # the joining rows' first tokens (their target prefill), then the merge
            _first_tokens(runner, 1, len(prompts) - half, g)
            runner.merge(0, 1)
        if r == join_after:
            t = time.perf_counter()
            runner.start(1, _samp(len(prompts) - half, greedy), prompts[half:], 64, joins=0)
            start_s = time.perf_counter() - t
        out.append(_round(runner, k, g))
    return out, start_s


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("greedy", [True, False])
def test_rows_primed_beside_propose_what_rows_primed_in_line_do(tiny_dir, monkeypatch, device, greedy):
    draft = ResidentModel.from_source(Checkpoint(tiny_dir("llama", seed=1, num_hidden_layers=2)), device)
    prompts = [p + [5] * (i % 3) for i, p in enumerate(PROMPTS)] * 2
    k = 3

    def run(beside: bool):
        runner = SpecRunner(draft, device, window=4, sinks=2, graphs=device == "cuda", prime_beside=beside)
        return _job(runner, prompts, k, greedy)

    want, _ = run(False)
    threads = _slow_priming(monkeypatch, 0.3)
    got, start_s = run(True)
    # batch 0 primed in line; the joining rows' start returned while their priming waited on its thread
    assert threads == ["MainThread", "draft-priming_0"] and start_s < 0.3
    assert len(want) == len(got) == 5 and want[-1][0].shape[0] == len(prompts)
    for (wp, wq), (gp, gq) in zip(want, got):
        assert torch.equal(wp, gp)
        assert (wq is None) == greedy and (greedy or torch.allclose(wq, gq, atol=1e-5))


def test_a_failed_priming_is_the_error_of_every_use_of_its_rows_and_a_dropped_batch_waits_for_it(
        tiny_dir, monkeypatch):
    draft = ResidentModel.from_source(Checkpoint(tiny_dir("llama", seed=1, num_hidden_layers=2)))
    prompts = [p + [5] * (i % 3) for i, p in enumerate(PROMPTS)]
    runner = SpecRunner(draft, "cpu", window=4, sinks=2, graphs=False, prime_beside=True)
    V = draft.spec.vocab_size
    runner.start(0, _samp(2, True), prompts[:2], 64)
    runner.finish(0, torch.randn(2, 1, V), 0, None, np.zeros(2, np.float32), first=True)
    _slow_priming(monkeypatch, 0.1, fail=True)
    runner.start(1, _samp(2, True), prompts[2:], 64, joins=0)
    with pytest.raises(RuntimeError, match="injected priming failure"):  # their first tokens
        runner.finish(1, torch.randn(2, 1, V), 0, None, np.zeros(2, np.float32), first=True)
    with pytest.raises(RuntimeError, match="injected priming failure"):  # not a half-primed merge
        runner.merge(0, 1)
    assert runner.batches[0].last.shape[0] == 2 and runner.batches[0].draft_cache.batch == 2  # batch 0 as it was
    runner.free(1)
    _slow_priming(monkeypatch, 0.2)
    runner.start(2, _samp(2, True), prompts[2:], 64, joins=0)
    priming = runner.batches[2].priming
    assert not priming.done()
    runner.free(2)  # waits for the priming: its cache's memory is not reused under it
    assert priming.done() and 2 not in runner.batches


def test_refilled_rows_primed_beside_keep_greedy_output(tiny_dir):
    """Through the scheduler (the in-process backend, rows refilled as sequences finish): the
    same tokens as transformers with the joining rows primed beside."""
    from test_refill import REQS, _backend, _run, _want

    d = tiny_dir("llama")
    backend = _backend(d, "window")
    backend.spec.prime_beside = True
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for _, n in REQS]
    st, out = _run(backend, params, refill=True)
    assert st.joins > 0 and backend.spec._primer is not None
    assert [o for o, _ in out] == _want(d)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("greedy,fp8", [(True, False), (False, False), (True, True)])
def test_joining_rows_take_finished_rows_in_place(tiny_dir, device, greedy, fp8):
    draft = ResidentModel.from_source(Checkpoint(tiny_dir("llama", seed=1, num_hidden_layers=2)), device)
    # the first rows' prompts run past the ring (window 4 + 18 new tokens), so their slots hold
    # wrapped positions: the joining rows, short, must bring their own
    prompts = [p * 6 + [5] * (i % 3) for i, p in enumerate(PROMPTS)] * 2
    prompts[6:8] = PROMPTS[2:4]
    B, k = 6, 3
    from specoffload.speculation.draft_graph import _storage_key

    def run(lazy: bool):
        runner = SpecRunner(draft, device, window=4, sinks=2, fp8=fp8, graphs=device == "cuda", lazy_rows=lazy)
        g = torch.Generator().manual_seed(0)
        runner.start(0, _samp(B, greedy), prompts[:B], 64)
        _first_tokens(runner, 0, B, g)
        out, keys, graphs = [], [], []
        for r in range(5):
            if r == 2:  # rows 1 and 3 finished a round ago; two waiting requests take their places
                runner.start(1, _samp(2, greedy), prompts[B:B + 2], 64, joins=0)
                _first_tokens(runner, 1, 2, g)
                keys.append(_storage_key(runner.batches[0].draft_cache))
                graphs.append(runner._graphs.get(0))
                runner.merge(0, 1)
                keys.append(_storage_key(runner.batches[0].draft_cache))
            out.append(_round(runner, k, g))
            if r == 1:
                runner.keep(0, np.array([0, 2, 4, 5], dtype=np.int64))
            if r == 2:
                graphs.append(runner._graphs.get(0))
        return out, keys, graphs, runner

    want, eager_keys, _, _ = run(False)
    got, lazy_keys, graphs, runner = run(True)
    assert eager_keys[0][0] == 4 and eager_keys[1][0] == 6  # dropped, then appended: new storage
    assert lazy_keys[0] == lazy_keys[1] and lazy_keys[0][0] == 6  # the same storage, rows in place
    assert runner.batches[0].rows.tolist() == [0, 2, 4, 5, 1, 3]
    if device == "cuda":  # the step captured before the join replayed after it, not a new capture
        assert graphs[0] is not None and graphs[1] is graphs[0] and not graphs[0].stale
    for (wp, wq), (gp, gq) in zip(want, got):
        assert torch.equal(wp, gp)
        assert (wq is None) == greedy and (greedy or torch.allclose(wq, gq, atol=1e-5))


def test_refilled_rows_taking_finished_rows_in_place_keep_greedy_output(tiny_dir):
    from test_refill import REQS, _backend, _run, _want

    d = tiny_dir("llama")
    backend = _backend(d, "window")
    backend.spec.lazy_rows = True
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for _, n in REQS]
    st, out = _run(backend, params, refill=True)
    assert st.joins > 0
    assert [o for o, _ in out] == _want(d)
