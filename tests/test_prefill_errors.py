"""A prefill that fails on the executor reports its first error, not the consequences.

The driver queues every (layer, sub-batch) prefill call before it waits on the head. In W1
(session 6) one ran out of GPU memory at a layer; the calls queued behind it failed with
"every slot holds a layer in use" and the head with KeyError 'logits', which is what the user
saw. Then each call raised the first error object again, its traceback longer with every raise
(W4's error came ~150 s late, scripts/ray_failed_calls.py). Now the calls return None and only
the head raises.
Exercised on the executor's methods with the layer's work replaced (an out-of-memory needs a
GPU; the bookkeeping around it does not)."""

from __future__ import annotations

import contextlib
import faulthandler
import signal
import sys
from types import SimpleNamespace

import pytest
import torch

from specoffload.actors.gpu_executor import GPUExecutor
from specoffload.errors import CapacityError
from specoffload.placement.plan import Plan
import gpu  # noqa: E402  (tests/ is on sys.path: conftest.py)


class _Fake:
    def __init__(self, fail_at, error):
        self.plan = Plan(prefill_batch=2)
        self.st = {"prompts": [[1] * 7, [1] * 9, [1] * 4]}
        self.calls, self.fail_at, self.error = [], fail_at, error
        self.resets = 0
        self.streamer = SimpleNamespace(reset=self._reset)

    def _reset(self):
        self.resets += 1

    def _prefill_failed(self, st, in_pass=False):
        GPUExecutor._prefill_failed(self, st, in_pass)

    def _batch(self, bid):
        return self.st

    _joined_copies = GPUExecutor._joined_copies

    def _prefill_layer(self, st, bid, s, j, in_pass=False):
        self.calls.append((s, j))
        st.setdefault("subs", {})[s] = "activations"
        if (s, j) == self.fail_at:
            raise self.error
        return "kv"


def _run(fake):
    """Every call of a 3-layer, 2-sub-batch prefill (none may raise), then the head's error."""
    results = [GPUExecutor.prefill_layer(fake, 0, s, j) for j in range(3) for s in range(2)]
    with pytest.raises(Exception) as head:
        GPUExecutor.prefill_head(fake, 0, None)
    return results, head.value


def test_out_of_memory_in_prefill_is_a_capacity_error_reported_once():
    fake = _Fake((0, 1), torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 448.00 MiB.\nmore"))
    results, head = _run(fake)
    assert fake.calls == [(0, 0), (1, 0), (0, 1)]  # nothing ran after the failure
    assert fake.resets == 1 and "subs" not in fake.st  # slots and activations given back, once
    assert results == ["kv", "kv", None, None, None, None]  # the failing call and the rest: nothing to store
    assert isinstance(head, CapacityError)
    assert str(head) == ("prefill ran out of GPU memory at layer 1 (sub-batch of 2 sequences, longest 9 tokens): "
                         "lower prefill_batch or raise gpu_memory (CUDA out of memory. Tried to allocate 448.00 MiB.)")


def test_other_prefill_errors_pass_through_unchanged():
    boom = RuntimeError("kernel refused")
    fake = _Fake((1, 2), boom)
    results, head = _run(fake)
    assert results[-1] is None and head is boom
    assert fake.calls[-1] == (1, 2)


def test_the_worker_stores_nothing_for_a_failed_prefill():
    from specoffload.actors.cpu_attention import CPUAttention

    spec = SimpleNamespace(num_layers=2, num_kv_heads=1, head_dim=4, torch_dtype=torch.float32,
                           sliding_windows=(None, None))
    at = CPUAttention.__new__(CPUAttention)
    at.spec, at.caches = spec, {}
    assert CPUAttention.store_prefill(at, 0, 0, 1, None) is None  # not even the batch is looked up


class _Ahead:
    """An executor whose layer work is replaced: what is launched, sent and released, in order."""

    def __init__(self, fail_at=None):
        self.spec = SimpleNamespace(num_layers=2)
        self.plan = Plan(prefill_batch=2)
        self.device = torch.device("cpu")
        self.st = {"prompts": [[1] * 7, [1] * 9, [1] * 4, [1] * 3, [1] * 5]}  # 3 sub-batches
        self.log, self.fail_at = [], fail_at
        self.streamer = SimpleNamespace(reset=lambda: self.log.append("reset"))
        self.timer = SimpleNamespace(host_span=lambda *a: contextlib.nullcontext())
        self.mail = SimpleNamespace(ensure_ring=lambda *a: "ring")

    def _batch(self, bid):
        return self.st

    def _pass_boundary(self):
        pass

    def _done(self, j):
        self.log.append(("release", j))

    def _prefill_compute(self, st, bid, s, j):
        self.log.append(("launch", s, j))
        if (s, j) == self.fail_at:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 96.00 MiB.")
        return SimpleNamespace(k=[torch.zeros(1)], v=[torch.zeros(1)])

    def send(self, ring, call, k, v):
        self.log.append(("send", call))
        return ("handle", call)

    for _name in ("_prefill_layer", "_send_ahead", "_prefill_failed", "prefill_layer", "_joined_copies",
                  "_keep_gpu_rows"):
        locals()[_name] = getattr(GPUExecutor, _name)


def test_prefill_launches_the_next_sub_batch_before_it_waits(monkeypatch):
    """Each call sends its K/V, then launches the next sub-batch's layer before it waits for the
    copies, so the device is not idle while Ray returns the call and starts the next. Within a
    layer only: the layer is released once its last sub-batch is launched, and each call still
    returns its own K/V."""
    from specoffload.actors import gpu_executor

    ex = _Ahead()
    monkeypatch.setattr(gpu_executor.kv_ring, "send", ex.send)
    got = [ex.prefill_layer(0, s, j) for j in range(2) for s in range(3)]
    assert got == [("handle", c) for c in range(6)]
    assert ex.log == [("launch", 0, 0), ("send", 0), ("launch", 1, 0), ("send", 1), ("launch", 2, 0),
                      ("release", 0), ("send", 2),
                      ("launch", 0, 1), ("send", 3), ("launch", 1, 1), ("send", 4), ("launch", 2, 1),
                      ("release", 1), ("send", 5)]


def test_a_call_out_of_order_after_a_launch_ahead_is_an_error(monkeypatch):
    """The driver queues a batch's calls layer by layer, sub-batch by sub-batch. Were another
    call to come where one was launched ahead, that sub-batch is already a layer on: an error,
    not a silent recompute."""
    from specoffload.actors import gpu_executor

    ex = _Ahead()
    monkeypatch.setattr(gpu_executor.kv_ring, "send", ex.send)
    assert ex.prefill_layer(0, 0, 0) == ("handle", 0)
    assert ex.prefill_layer(0, 2, 0) is None
    assert "sub-batch 2, layer 0 came where sub-batch 1, layer 0 was launched ahead" in str(ex.st["prefill_error"])


def test_without_a_ring_each_call_launches_its_own(monkeypatch):
    """Where the ring could not be page-locked (or none was asked for) the K/V go through Ray's
    object store as before: each call launches its own layer and nothing runs ahead."""
    from specoffload.actors import gpu_executor

    ex = _Ahead()
    monkeypatch.setattr(gpu_executor.kv_ring, "send", ex.send)
    ex.mail.ensure_ring = lambda *a: None
    got = [ex.prefill_layer(0, s, 0) for s in range(3)]
    assert all(isinstance(g, tuple) and len(g) == 2 for g in got)  # wire arrays
    assert ex.log == [("launch", 0, 0), ("launch", 1, 0), ("launch", 2, 0), ("release", 0)]


def test_out_of_memory_in_a_launch_ahead_is_the_next_calls_error(monkeypatch):
    """Sub-batch 1's layer runs out of memory while call 0 launches it ahead: call 0 still
    returns its K/V; call 1 reports the error as its own (its sub-batch's longest prompt), and
    the calls after it store nothing."""
    from specoffload.actors import gpu_executor

    ex = _Ahead(fail_at=(1, 0))
    monkeypatch.setattr(gpu_executor.kv_ring, "send", ex.send)
    got = [ex.prefill_layer(0, s, j) for j in range(2) for s in range(3)]
    assert got == [("handle", 0), None, None, None, None, None]
    assert ex.log == [("launch", 0, 0), ("send", 0), ("launch", 1, 0), "reset"]
    err = ex.st["prefill_error"]
    assert isinstance(err, CapacityError) and "at layer 0 (sub-batch of 2 sequences, longest 4 tokens)" in str(err)
    assert "ahead" not in ex.st and "subs" not in ex.st


def test_failed_prefill_leaves_no_unhandled_errors(ray_session, capfd, caplog):
    """The driver sees the head's error once; the K/V stores that failed behind it are collected,
    not each logged by Ray as an unhandled error when their refs go."""
    import gc
    import time

    import ray
    from specoffload.actors.actor_backend import ActorBackend

    # defined here so that Ray pickles them by value (the workers cannot import test modules)
    class Executor:  # fails prefill at layer 1 as the real one does: the first error, then again
        def __init__(self):
            self.err = None

        def prefill_layer(self, bid, s, j):
            if self.err is None and j == 1:
                self.err = CapacityError("prefill ran out of GPU memory at layer 1")
            if self.err is not None:
                raise self.err
            return b"k", b"v"

        def prefill_head(self, bid, u):
            raise self.err

    class Attention:
        def store_prefill(self, bid, s, j, kv):
            return None

    be = ActorBackend(ray.remote(Executor).remote(), ray.remote(Attention).remote(), num_layers=6,
                      prefill_batch=2)
    be._size[0] = 4  # two prefill sub-batches
    head = be.prefill(0, None)
    with pytest.raises(CapacityError, match="layer 1"):
        be.get(head)
    del head, be
    gc.collect()
    time.sleep(2)  # Ray reports unhandled errors when a failed ref is freed
    out, err = capfd.readouterr()
    assert "Unhandled error" not in out + err + caplog.text


def test_out_of_memory_in_a_verification_layer_is_a_capacity_error():
    class Fake:
        def __init__(self):
            self.resets = 0
            self.streamer = SimpleNamespace(reset=lambda: setattr(self, "resets", self.resets + 1))
            self.failed = []  # batches whose mailboxes were marked failed (the doorbells' waiters stop)
            self.mail = SimpleNamespace(fail=self.failed.append)
            self.st = {"parts": [{"lo": 0, "hi": 48, "q_lens_np": [9] * 48}]}
            self.post_early = True  # plan.early_posts (a Ray hand-off, so no part is finished early)

        def _batch(self, bid):
            return self.st

        def _post(self, part, j, attn):
            pass

        def _pre(self, part, j):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore")

    fake = Fake()
    with pytest.raises(CapacityError) as e:
        GPUExecutor.target_layer(fake, 0, 5, None)
    assert str(e.value) == ("a verification pass ran out of GPU memory at layer 5 (48 sequences, 9 tokens each): "
                            "lower batch_size or the draft length, or raise gpu_memory "
                            "(CUDA out of memory. Tried to allocate 2.00 GiB.)")
    assert fake.resets == 1 and fake.failed == [0]


@contextlib.contextmanager
def _deadline(seconds: int):
    """Fail, not hang: past `seconds` every thread's stack is printed and the test raises."""
    def expired(signum, frame):
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        raise TimeoutError(f"still running after {seconds} s (stacks above)")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_generate_again_after_prefill_runs_out_of_memory_on_the_actors(ray_session, tiny_dir):
    """The real actors on the CPU, an out-of-memory injected in the executor's prefill: the first
    generate is the one-line CapacityError, the failed batch is freed on the executor and the
    CPU worker (before, it stayed there: a draft's KV cache on the GPU, and state under the id
    the next run starts again from), and the same LLM then generates exactly."""
    import ray
    from hf_reference import PROMPTS, hf_greedy
    from specoffload.actors.supervisor import actors
    from specoffload.configs.sampling_params import SamplingParams
    from specoffload.llm import LLM

    # defined here so that Ray pickles them by value (the workers cannot import test modules)
    def inject_out_of_memory(self, layer: int):
        """In the executor's process: its next prefill raises a CUDA out-of-memory at `layer`,
        as a capped GPU does, once."""
        import torch

        run, left = self._prefill_layer, [1]

        def failing(st, bid, s, j, in_pass=False):
            if j == layer and left:
                left.pop()
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB.\nmore")
            return run(st, bid, s, j, in_pass)

        self._prefill_layer = failing

    def held(self, *attrs):
        """The batch ids an actor holds in each of `attrs` (dotted attribute paths)."""
        out = {}
        for a in attrs:
            obj = self
            for part in a.split("."):
                obj = getattr(obj, part)
            out[a] = sorted(obj)
        return out

    d = tiny_dir("llama")
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    want = hf_greedy(d, PROMPTS, 8)
    with _deadline(240), LLM(str(d), device="cpu", batch_size=64, progress=False) as llm:
        h = actors(llm.run_id)
        ex, at = h["gpu_executor"], h["cpu_attention"]
        ray.get(ex.__ray_call__.remote(inject_out_of_memory, 1), timeout=60)
        with pytest.raises(CapacityError, match="prefill ran out of GPU memory at layer 1 .sub-batch of 16"):
            llm.generate([{"prompt_token_ids": [1] + [5 + i % 80 for i in range(239)]}] * 64, params)
        assert ray.get(ex.__ray_call__.remote(held, "tb", "_failed", "runner.batches"), timeout=60) == {
            "tb": [], "_failed": [], "runner.batches": []}
        assert ray.get(at.__ray_call__.remote(held, "caches", "prompt_lens"), timeout=60) == {
            "caches": [], "prompt_lens": []}
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
        assert [o.outputs[0].token_ids for o in outs] == want
        assert llm.last_stats["restarts"] == 0


def test_a_start_that_fails_is_reported_not_an_earlier_runs_batch():
    """A batch id an earlier run left on the executor: a start under that id that fails is what
    its prefill calls raise; they never run on the stale batch."""
    boom = RuntimeError("draft cache refused")
    freed = []

    def start(*a):
        raise boom

    fake = SimpleNamespace(tb={0: {"prompts": [[1] * 240] * 64}}, _failed={}, _drafting={},
                           runner=SimpleNamespace(start=start, free=freed.append),
                           mail=SimpleNamespace(free=lambda bid: None, drop_spares=lambda: None),
                           timer=SimpleNamespace(span=lambda *a: contextlib.nullcontext()))
    fake.free = lambda bid: GPUExecutor.free(fake, bid)
    fake._batch = lambda bid: GPUExecutor._batch(fake, bid)
    with pytest.raises(RuntimeError, match="draft cache refused"):
        GPUExecutor.start(fake, 0, [[1, 2]], None, 16, False)
    assert freed == [0] and fake.tb == {}
    assert GPUExecutor.prefill_layer(fake, 0, 0, 0) is None  # never run on the stale batch
    with pytest.raises(RuntimeError, match="batch 0 did not start on the executor: draft cache refused"):
        GPUExecutor.prefill_head(fake, 0, None)


@gpu.cuda_only("an out-of-memory needs a GPU cap")
def test_generate_again_after_prefill_runs_out_of_memory(ray_session, tiny_dir):
    """Under a cap that holds the model but not the attention of 16 long prompts at once, the
    first generate is a CapacityError; the same LLM then serves short prompts exactly (the
    executor gave back the failed batch's activations and weight slots)."""
    from hf_reference import PROMPTS, hf_greedy
    from specoffload.configs.sampling_params import SamplingParams
    from specoffload.llm import LLM

    d = tiny_dir("llama")
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    with LLM(str(d), device="cuda", progress=False) as llm:  # the cap counts the CUDA context: measure it
        context = llm.info["gpu_context"]
    # cuBLAS takes a 32 MiB workspace from the allocator at the first matmul: 48 MiB leaves
    # room for short prompts, not for the attention of 16 prompts of 240 tokens.
    # 29 s on the H200 in the whole `pytest -m cuda` (2026-12-02): a hang fails with every stack.
    with _deadline(180), LLM(str(d), device="cuda", gpu_memory=context + (48 << 20), batch_size=64,
                             progress=False) as llm:
        with pytest.raises(CapacityError, match="prefill ran out of GPU memory"):
            llm.generate([{"prompt_token_ids": [1] + [5 + i % 80 for i in range(239)]}] * 64, params)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(d, PROMPTS, 8)


def test_a_stored_error_raised_again_keeps_a_short_traceback():
    """A batch whose start failed raises its stored error on every call; raised as it was, the
    one object's traceback grew with each raise (quadratic cost through Ray: 960 calls took
    110 s, scripts/ray_failed_calls.py)."""
    import traceback

    fake = SimpleNamespace(tb={}, _failed={0: CapacityError("the draft does not fit")})
    depths = []
    for _ in range(4):
        with pytest.raises(CapacityError) as e:
            GPUExecutor._batch(fake, 0)
        depths.append(len(traceback.extract_tb(e.value.__traceback__)))
    assert depths == [depths[0]] * 4


def test_a_host_kv_cache_that_cannot_be_allocated_is_the_runs_error(ray_session, tiny_dir):
    """The CPU worker's start fails (its host KV cache refused by the allocator): the run's error
    says so in one line, not the KeyError its first store or attention call met on a batch it
    never made; the failed batch is freed and the same LLM then generates exactly."""
    import ray
    from hf_reference import PROMPTS, hf_greedy
    from specoffload.actors.supervisor import actors
    from specoffload.configs.sampling_params import SamplingParams
    from specoffload.llm import LLM

    def refuse_once(self):
        """In the worker's process: the next KV cache it makes fails as torch's CPU allocator does."""
        from specoffload.actors import cpu_attention

        make, left = cpu_attention.KVCache, [1]

        def failing(*a, **kw):
            if left:
                left.pop()
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                                   "68719476736 bytes. Error code 12 (Cannot allocate memory)")
            return make(*a, **kw)

        cpu_attention.KVCache = failing

    def held(self):
        return sorted(self.caches), sorted(self._failed)

    d = tiny_dir("llama")
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    with _deadline(240), LLM(str(d), device="cpu", batch_size=4, progress=False) as llm:
        at = actors(llm.run_id)["cpu_attention"]
        ray.get(at.__ray_call__.remote(refuse_once), timeout=60)
        with pytest.raises(CapacityError, match=r"the host KV cache of \d+ sequences x \d+ tokens .* could not be "
                                                r"allocated: lower batch_size .*can't allocate memory"):
            llm.generate(prompts, params)
        assert ray.get(at.__ray_call__.remote(held), timeout=60) == ([], [])
        outs = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(d, PROMPTS, 8)
