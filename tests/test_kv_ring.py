"""The prefill's K/V through a ring of shared-memory slots (plan.shm_prefill): what the
executor sends is what the worker reads, slots rotate and are freed, and output through the
actors equals transformers' with and without it, rows joining a pass included."""

from __future__ import annotations

import os

import pytest
import torch

from hf_reference import PROMPTS, hf_greedy
from specoffload.actors import kv_ring, mailbox
from specoffload.actors.kv_ring import RingReader, is_handle
from specoffload.actors.mailbox import ExecutorMailboxes
from specoffload.configs.sampling_params import SamplingParams
from specoffload.llm import LLM
from specoffload.models.spec import ModelSpec
from specoffload.placement.plan import Plan
import gpu  # noqa: E402  (tests/ is on sys.path: conftest.py)


def _spec():
    return ModelSpec(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                     num_heads=4, num_kv_heads=2, head_dim=8, rms_eps=1e-5, rope_theta=1e4, max_positions=64,
                     dtype="bfloat16")


def test_round_trip_through_rotating_slots_and_free(tmp_path):
    spec, g = _spec(), torch.Generator().manual_seed(0)
    ex, wk = ExecutorMailboxes(spec, str(tmp_path), torch.device("cpu")), RingReader(spec)
    ring = ex.ensure_ring(3, rows=4, tokens=10)
    assert ex.ensure_ring(3, rows=4, tokens=10) is ring  # one ring per batch
    slots = []
    for call in range(2 * kv_ring.SLOTS + 1):
        n, length = 1 + call % 4, 3 + call % 8  # sub-batches and prompts of different sizes
        k, v = (torch.randn(n, 2, length, 8, generator=g).bfloat16() for _ in range(2))
        h = kv_ring.send(ring, call, k, v)
        assert is_handle(h) and not is_handle((None, k))
        rk, rv = wk.recv(h)
        assert torch.equal(rk, k) and torch.equal(rv, v)
        slots.append(h[4])
    assert slots == [c % kv_ring.SLOTS for c in range(len(slots))]
    with pytest.raises(ValueError):
        ring.view(0, 0, 5, 3)  # more rows than the ring holds
    assert len(os.listdir(tmp_path)) == 1 and len(wk.maps) == 1
    ex.free(3)
    wk.free(3)
    assert len(os.listdir(tmp_path)) == 1 and len(wk.maps) == 1  # kept for the next batch, mapped on both sides
    ex.drop_spares()  # the executor, once no batch is left
    wk.free(3)
    assert os.listdir(tmp_path) == [] and not wk.maps
    assert ExecutorMailboxes(spec, None, torch.device("cpu")).ensure_ring(3, 4, 10) is None  # no folder: the store


def test_a_finished_batchs_ring_serves_the_next_and_the_worker_keeps_its_mapping(tmp_path):
    """A joining batch's ring used to be made and page-locked in the pass it rode (~60 ms on
    the GPU machine, every join). A freed ring now serves the next batch whose rows and
    prompts fit it; the worker reads the new batch's K/V through the mapping it has, and maps
    again only a file that changed under the same name."""
    spec, g = _spec(), torch.Generator().manual_seed(1)
    ex, wk = ExecutorMailboxes(spec, str(tmp_path), torch.device("cpu")), RingReader(spec)
    first = ex.ensure_ring(1, rows=4, tokens=10)
    assert first.tokens == mailbox.RING_TOKENS  # sized up, so that longer prompts fit it later
    k, v = (torch.randn(4, 2, 10, 8, generator=g).bfloat16() for _ in range(2))
    wk.recv(kv_ring.send(first, 0, k, v))
    mapped = wk.maps[first.path][0]
    ex.free(1)
    wk.free(1)
    again = ex.ensure_ring(2, rows=3, tokens=mailbox.RING_TOKENS)
    assert again is first and len(os.listdir(tmp_path)) == 1
    k, v = (torch.randn(3, 2, 7, 8, generator=g).bfloat16() for _ in range(2))
    rk, rv = wk.recv(kv_ring.send(again, 5, k, v))
    assert torch.equal(rk, k) and torch.equal(rv, v) and wk.maps[first.path][0] is mapped
    # more rows, or longer prompts, than any spare holds: a ring of their own
    wider = ex.ensure_ring(3, rows=5, tokens=10)
    longer = ex.ensure_ring(4, rows=4, tokens=mailbox.RING_TOKENS + 1)
    assert len({again.path, wider.path, longer.path}) == 3 and longer.tokens == 2 * mailbox.RING_TOKENS
    for bid in (2, 3, 4):
        ex.free(bid)
    assert len(ex._spare_rings) == mailbox.SPARE_RINGS and again.buf is None  # the smallest went
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(r.path) for r in (wider, longer))
    wk.free(4)
    assert list(wk.maps) == []  # its file is gone: unmapped
    # a file replaced under a name the worker has mapped (not something the executor does): mapped anew
    k, v = (torch.randn(4, 2, 9, 8, generator=g).bfloat16() for _ in range(2))
    wk.recv(kv_ring.send(wider, 1, k, v))
    os.unlink(wider.path)
    swapped = kv_ring.KVRing(wider.path, 5, 16, spec, create=True)
    rk, _ = wk.recv(kv_ring.send(swapped, 1, k, v))
    assert torch.equal(rk, k)
    wk.free(4, idle=True)  # the worker's last batch is gone: nothing stays mapped
    assert not wk.maps
    ex.close()
    wk.close()


def test_the_flag_needs_mailboxes():
    # the plain path (no mailboxes) hands everything over through Ray's object store
    assert not Plan(shm_prefill=True, shm_activations=False).shm_prefill
    assert Plan().shm_prefill  # on: measured faster on the GPU machine (docs/benchmarks.md, session 18)


def test_greedy_identical_through_actors_with_the_ring(ray_session, tiny_dir):
    """Sub-batches of 1 over 4 prompts and every layer: more calls than slots, so each slot is
    reused once its store is done; output equal to transformers'. (The ring carries K/V of any
    family alike: one MoE family is enough.)"""
    d = tiny_dir("mixtral")
    want = hf_greedy(d, PROMPTS, 12)
    with LLM(str(d), plan=Plan(device="cpu", shm_prefill=True, prefill_batch=1), batch_size=4,
             progress=False) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(max_tokens=12, ignore_eos=True))
        stats = llm.last_stats
    assert [o.outputs[0].token_ids for o in outs] == want
    layers = 3  # tiny_dir's mixtral
    assert stats["prefill_ring_stores"] >= len(PROMPTS) * layers > kv_ring.SLOTS


@gpu.cuda_only("launching a sub-batch ahead of the ring's copies matters on a device stream")
def test_prefill_launched_ahead_on_the_gpu(ray_session, tiny_dir):
    """On CUDA, float32: each prefill call launches the next sub-batch's layer before it waits
    for its own K/V's copies into the ring, which run on a stream of their own
    (`GPUExecutor._send_ahead`); with sub-batches of 1 every call but a layer's last does.
    Greedy output is transformers' own."""
    d = tiny_dir("llama")
    want = hf_greedy(d, PROMPTS, 12)
    with LLM(str(d), plan=Plan(device="cuda", shm_prefill=True, prefill_batch=1), batch_size=4, dtype="float32",
             progress=False) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(max_tokens=12, ignore_eos=True))
        stats = llm.last_stats
    assert [o.outputs[0].token_ids for o in outs] == want
    assert stats["prefill_ring_stores"] >= len(PROMPTS) * 3  # tiny_dir's llama: 3 layers


def test_rows_joining_a_pass_prefill_through_the_ring(ray_session, tiny_dir):
    """Refill with the joining rows' prefill riding the batch's pass: their calls interleave
    with the pass's layers and go through a ring of their own."""
    from test_refill import REQS, _want

    d = tiny_dir("llama")
    with LLM(str(d), draft="self:1", batch_size=3, k=3, progress=False, refill=True, refill_prefill="pass",
             plan=Plan(device="cpu", shm_prefill=True, prefill_batch=1)) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p, _ in REQS],
                            [SamplingParams(max_tokens=n, ignore_eos=True) for _, n in REQS])
        stats = llm.last_stats
    assert [o.outputs[0].token_ids for o in outs] == _want(d)
    assert stats["joins"] > 0 and stats["prefill_ring_stores"] > 0


def test_failed_registration_falls_back_to_the_object_store(tmp_path, monkeypatch):
    def refuse(self):
        raise RuntimeError(f"cudaHostRegister failed (1) for KV ring {self.path}")

    monkeypatch.setattr(kv_ring.KVRing, "register", refuse)
    ex = ExecutorMailboxes(_spec(), str(tmp_path), torch.device("cuda"))  # registration is tried on CUDA only
    with pytest.warns(RuntimeWarning, match="prefill K/V go through Ray's object store"):
        assert ex.ensure_ring(0, 4, 8) is None
    assert ex.ensure_ring(1, 4, 8) is None and not ex.boxes and os.listdir(tmp_path) == []


@gpu.cuda_only("a page-locked ring and its DMAs need CUDA")
def test_cuda_round_trip():
    """On the GPU the ring is registered and the K/V are DMAs on the current stream, in
    /dev/shm like the engine's."""
    import tempfile

    from specoffload.actors.io_loader import default_shm_root

    spec, g = _spec(), torch.Generator().manual_seed(4)
    dev = torch.device("cuda", torch.cuda.current_device())
    tmp = tempfile.mkdtemp(dir=default_shm_root())
    ex, wk = ExecutorMailboxes(spec, tmp, dev), RingReader(spec)
    ring = ex.ensure_ring(0, 3, 16)
    assert ring.registered
    for call in range(kv_ring.SLOTS + 2):
        k, v = (torch.randn(3, 2, 5 + call, 8, generator=g).bfloat16().to(dev) for _ in range(2))
        handle = kv_ring.send(ring, call, k, v)
        torch.cuda.current_stream(dev).synchronize()
        rk, rv = wk.recv(handle)
        assert torch.equal(rk, k.cpu()) and torch.equal(rv, v.cpu())
    ex.close()
    wk.close()
    assert os.listdir(tmp) == []
    os.rmdir(tmp)


def _late_stores():
    """For `__ray_call__` (pickled by value): the CPU worker's K/V stores start late, as they
    do when it is still attending for the pass before while the executor prefills ahead;
    fail: the first store of batch 1 (the first rows to join) raises instead."""

    def _late(self, seconds: float, fail: bool = False):
        import time

        recv, left, rings = self.ring.recv, [fail], []

        def late(handle):
            time.sleep(seconds)
            if handle[1] not in rings:
                rings.append(handle[1])
            # the first rows to join: the first ring after batch 0's, which that batch holds to its end
            if left[0] and handle[1] == rings[-1] and len(rings) == 2:
                left[0] = False
                raise RuntimeError("injected store failure")
            return recv(handle)

        self.ring.recv = late

    return _late


@pytest.mark.parametrize("prefill", ["own", "pass"])
def test_joining_rows_merge_after_the_worker_stored_their_kv(ray_session, tiny_dir, prefill):
    """The executor's prefill of joining rows does not wait for the worker (its ring has more
    slots than the tiny model has layers), so their first tokens, and the merge, can come
    before the worker has read a slot. Merging must not remove the ring under the worker: a
    store that found no file left those rows without a layer's K/V (wrong tokens; the CI
    failure of session 24, where all rows had finished and the join ran a prefill of its own)."""
    import ray
    from specoffload.actors.supervisor import actors
    from test_refill import REQS, _want

    d = tiny_dir("llama")
    with LLM(str(d), draft="self:1", batch_size=3, k=3, progress=False, refill=True, refill_prefill=prefill,
             plan=Plan(device="cpu", shm_prefill=True)) as llm:
        ray.get(actors(llm.run_id)["cpu_attention"].__ray_call__.remote(_late_stores(), 0.2), timeout=60)
        outs = llm.generate([{"prompt_token_ids": p} for p, _ in REQS],
                            [SamplingParams(max_tokens=n, ignore_eos=True) for _, n in REQS])
        stats = llm.last_stats
    assert stats["joins"] > 0 and stats["prefill_ring_stores"] > 0
    assert [o.outputs[0].token_ids for o in outs] == _want(d)


def test_a_store_that_fails_fails_the_run_instead_of_its_rows(ray_session, tiny_dir):
    """A K/V store the worker could not do is the run's error (not rows attending without that
    layer's K/V), and the same LLM then generates exactly."""
    import ray
    from specoffload.actors.supervisor import actors
    from specoffload.errors import SpecOffloadError
    from test_refill import REQS, _want

    d = tiny_dir("llama")
    prompts = [{"prompt_token_ids": p} for p, _ in REQS]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for _, n in REQS]
    with LLM(str(d), draft="self:1", batch_size=3, k=3, progress=False, refill=True, refill_prefill="own",
             plan=Plan(device="cpu", shm_prefill=True)) as llm:
        ray.get(actors(llm.run_id)["cpu_attention"].__ray_call__.remote(_late_stores(), 0.05, True), timeout=60)
        with pytest.raises(SpecOffloadError, match="injected store failure"):
            llm.generate(prompts, params)
        outs = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == _want(d)
