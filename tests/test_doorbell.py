"""Doorbells (plan.layer_doorbell): a pass's layers handed over by counters in the mailboxes,
every call queued up front. The hand-off order, a failed or vanished peer ending the wait, and
through the real actors: output token-identical to transformers', and a failure mid-pass
reported as its own error (not as the calls that stopped waiting behind it)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import torch

from specoffload.actors import doorbell
from specoffload.actors.doorbell import BELL, PeerFailed
from specoffload.actors.io_loader import default_shm_root
from specoffload.actors.mailbox import ExecutorMailboxes, WorkerMailboxes
from specoffload.models.spec import ModelSpec
import gpu  # noqa: E402  (tests/ is on sys.path: conftest.py)


def _spec():
    return ModelSpec(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                     num_heads=4, num_kv_heads=2, head_dim=8, rms_eps=1e-5, rope_theta=1e4, max_positions=64,
                     dtype="bfloat16")


def test_layers_hand_over_in_order_between_two_threads(tmp_path):
    """The executor posts q/k/v of layer j only after reading layer j-1's output, the worker
    waits for each post: every output read is the one computed from the layer's own q, over
    three passes (the counters keep growing across them), the second outgrowing the file."""
    spec, L = _spec(), 6
    ex, wk = ExecutorMailboxes(spec, str(tmp_path), torch.device("cpu"), doorbells=True), WorkerMailboxes(spec)
    errors = []

    def worker(msg):
        try:
            for j in range(L):
                q, k, v = wk.recv_qkv(msg, bell=j > 0)
                time.sleep(0.002)  # the executor must wait, not read a stale output
                wk.send_out(msg, (q.float() * 2 + k.float().sum()).bfloat16().reshape(q.shape[0], -1))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    for T in (3, 9, 9):
        box = ex.ensure(0, 0, T)
        want, t = [], None
        for j in range(L):
            if j:
                got = ex.recv_out(box, BELL, T)
                assert torch.equal(got, want[j - 1]), f"layer {j - 1} of a {T}-token pass"
            q = torch.full((T, 4, 8), float(j + 1)).bfloat16()
            k, v = torch.full((T, 2, 8), float(j)).bfloat16(), torch.zeros(T, 2, 8).bfloat16()
            want.append((q.float() * 2 + k.float().sum()).bfloat16().reshape(T, -1))
            msg = ex.send_qkv(box, q, k, v, lambda: None)
            if j == 0:  # layer 0's hand-off is Ray's (its message names the mailbox)
                t = threading.Thread(target=worker, args=(msg,))
                t.start()
        assert torch.equal(ex.recv_out(box, BELL, T), want[-1])
        t.join(10)
        assert not t.is_alive() and not errors
    assert box.bell[doorbell.QKV] == box.bell[doorbell.OUT] == 2 * L  # this file served the last two passes
    assert ex.bell_wait_s > 0 and wk.bell_wait_s > 0
    ex.close()


@gpu.cuda_only("page-locked mailboxes and their DMAs need CUDA")
def test_cuda_doorbell_hand_off():
    """On the GPU the executor's q/k/v are DMAs on its stream: the doorbell rings only after
    the stream is synchronized, so a worker that sees the counter reads the whole data, and the
    output it rings back reaches the device intact. In /dev/shm like the engine's."""
    spec, g = _spec(), torch.Generator().manual_seed(4)
    dev = torch.device("cuda", torch.cuda.current_device())
    folder = tempfile.mkdtemp(dir=default_shm_root())
    ex, wk = ExecutorMailboxes(spec, folder, dev, doorbells=True), WorkerMailboxes(spec)
    T, L = 64, 4
    box = ex.ensure(0, 0, T)
    assert box.registered
    sync = torch.cuda.current_stream(dev).synchronize
    qs = [torch.randn(T, 4, 8, generator=g).bfloat16().to(dev) for _ in range(L)]
    zeros = torch.zeros(T, 2, 8, dtype=torch.bfloat16, device=dev)
    msg = ex.send_qkv(box, qs[0], zeros, zeros, sync)
    seen = []

    def worker():
        for j in range(L):
            q, _, _ = wk.recv_qkv(msg, bell=j > 0)
            seen.append(q.clone())
            wk.send_out(msg, (q.float() + 1).bfloat16().reshape(T, -1))

    t = threading.Thread(target=worker)
    t.start()
    for j in range(1, L + 1):
        back = ex.recv_out(box, BELL, T)
        assert back.device == dev and torch.equal(back.cpu(), (qs[j - 1].cpu().float() + 1).bfloat16().reshape(T, -1))
        if j < L:
            ex.send_qkv(box, qs[j], zeros, zeros, sync)
    t.join(10)
    assert [torch.equal(a, b.cpu()) for a, b in zip(seen, qs)] == [True] * L
    ex.close()
    os.rmdir(folder)


def _one_hand_off(folder, bid: int):
    """Executor and worker mailboxes with one 2-token q/k/v posted and read through Ray's way."""
    spec = _spec()
    ex, wk = ExecutorMailboxes(spec, str(folder), torch.device("cpu"), doorbells=True), WorkerMailboxes(spec)
    box = ex.ensure(bid, 0, 2)
    msg = ex.send_qkv(box, torch.zeros(2, 4, 8).bfloat16(), torch.zeros(2, 2, 8).bfloat16(),
                      torch.zeros(2, 2, 8).bfloat16(), lambda: None)
    wk.recv_qkv(msg)
    return ex, wk, box, msg


def test_a_failed_side_ends_the_others_wait(tmp_path):
    ex, wk, box, msg = _one_hand_off(tmp_path, 3)
    threading.Timer(0.2, wk.fail, args=(msg,)).start()  # the worker's attention raised
    t0 = time.perf_counter()
    with pytest.raises(PeerFailed, match="the other side of the pass failed"):
        ex.recv_out(box, BELL, 2)
    assert time.perf_counter() - t0 < 5
    with pytest.raises(PeerFailed):  # and the worker's own queued calls stop too
        wk.recv_qkv(msg, bell=True)
    ex.close()


def test_a_vanished_peer_ends_the_wait(tmp_path, monkeypatch):
    """A killed actor sets nothing: the waiter notices its peer's process is gone."""
    monkeypatch.setattr(doorbell, "LIVENESS_S", 0.1)
    ex, _, box, _ = _one_hand_off(tmp_path, 0)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    box.bell[doorbell.WORKER_PID] = gone.pid  # as if the worker had died
    with pytest.raises(PeerFailed, match=f"pid {gone.pid}. is gone"):
        ex.recv_out(box, BELL, 2)
    ex.close()


def test_a_worker_that_dies_before_it_maps_a_new_mailbox_ends_the_wait(tmp_path, monkeypatch):
    """A pass that needs a larger mailbox gets a new file, which the worker maps (and writes its
    pid into) only at that pass's first layer. Killed before that, it wrote nothing there: the
    executor writes the worker's pid itself, so its wait still sees the process gone (CI hung
    for 25 minutes on the cpu_attention kill test without it)."""
    monkeypatch.setattr(doorbell, "LIVENESS_S", 0.1)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    ex = ExecutorMailboxes(_spec(), str(tmp_path), torch.device("cpu"), doorbells=True)
    ex.worker_pid = gone.pid  # what Coordinator gives the executor (set_worker_pid)
    box = ex.ensure(0, 0, 2)
    assert int(box.bell[doorbell.WORKER_PID]) == gone.pid
    ex.send_qkv(box, torch.zeros(2, 4, 8).bfloat16(), torch.zeros(2, 2, 8).bfloat16(),
                torch.zeros(2, 2, 8).bfloat16(), lambda: None)
    t0 = time.perf_counter()
    with pytest.raises(PeerFailed, match=f"pid {gone.pid}. is gone"):
        ex.recv_out(box, BELL, 2)
    assert time.perf_counter() - t0 < 5
    ex.close()


def test_doorbells_need_mailboxes():
    from specoffload.placement.plan import Plan

    assert Plan(device="cpu").layer_doorbell  # on by default: measured faster on the GPU machine
    assert not Plan(device="cpu", layer_doorbell=True, shm_activations=False).layer_doorbell  # the plain path


# -- the real actors --------------------------------------------------------------------------
@pytest.mark.parametrize("family,micro_batches,draft,schedule,bell,runs", [
    ("llama", 1, None, None, True, True), ("mixtral", 2, None, None, True, True),
    ("llama", 2, "self:1", "single", True, True),  # rows refilled: joining prefills ride the doorbell pass
    ("qwen2", 1, "self:1", "dual", True, True),  # the other batch's draft steps run between the layer calls
    ("llama", 2, "self:1", "single", True, False),  # doorbells, the worker's layers a call each
    ("llama", 2, "self:1", "single", False, True),  # mailboxes, each hand-off through Ray (the path before)
])
def test_greedy_identical_with_doorbells(ray_session, tiny_dir, family, micro_batches, draft, schedule, bell, runs):
    from hf_reference import PROMPTS, hf_greedy
    from specoffload.configs.sampling_params import SamplingParams
    from specoffload.llm import LLM
    from specoffload.placement.plan import Plan

    d = tiny_dir(family)
    want = hf_greedy(d, PROMPTS, 16)
    # plan.keep_freed_memory rides `bell`: the worker's process takes it (glibc), or not, and
    # the output is transformers' either way
    plan = Plan(device="cpu", layer_doorbell=bell, worker_layer_runs=runs, keep_freed_memory=bell)
    with LLM(str(d), plan=plan, batch_size=2, progress=False, micro_batches=micro_batches, draft=draft,
             schedule=schedule, k=3, refill=draft is not None) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(max_tokens=16, ignore_eos=True))
        stats = llm.last_stats
    assert [o.outputs[0].token_ids for o in outs] == want
    assert (stats["executor_bell_wait_s"] > 0) == bell  # the layers did hand over by doorbell, or not
    # the worker took each pass's middle layer in one call (plan.worker_layer_runs), or a call each
    assert (stats["worker_layer_runs"] > 0) == (bell and runs)
    assert stats["worker_keeps_freed_memory"] is bell


def _copy_always_pending():
    """For `__ray_call__` (pickled by value): the executor takes every layer's weights as still
    copying, after a pause that lets the worker finish the later parts' attention."""

    def _patch(self):
        import time

        def pending(j):
            time.sleep(0.02)
            return True

        self._copy_pending = pending

    return _patch


@pytest.mark.parametrize("draft,on", [(None, True), ("self:1", True), (None, False), (None, "switch")])
def test_parts_finished_while_weights_copy_keep_greedy_output(ray_session, tiny_dir, draft, on):
    """plan.early_posts: while a layer's weights still copy, the executor finishes the previous
    layer for the batch's later parts whose attention is back (`GPUExecutor._post_arrived`),
    ahead of their own calls, which then skip it. On the CPU nothing copies, so every layer is
    made to look pending: the output is transformers' own, and parts were finished early only
    where the plan says so. "switch": the plan has it off and the coordinator's `set_switch`
    turns it on for running actors (as bench does), which also says what the CPU cannot take."""
    import ray
    from hf_reference import PROMPTS, hf_greedy
    from specoffload.actors.supervisor import actors
    from specoffload.configs.sampling_params import SamplingParams
    from specoffload.llm import LLM
    from specoffload.placement.plan import Plan

    d = tiny_dir("llama")
    want = hf_greedy(d, PROMPTS, 10)
    with LLM(str(d), plan=Plan(device="cpu", early_posts=on is True), batch_size=4, progress=False, micro_batches=2,
             draft=draft, k=3) as llm:
        named = actors(llm.run_id)
        ray.get(named["gpu_executor"].__ray_call__.remote(_copy_always_pending()), timeout=60)
        if on == "switch":
            coord = named["coordinator"]
            assert ray.get(coord.set_switch.remote("early_posts", True), timeout=60) is True
            assert ray.get(coord.set_switch.remote("mapped_out", True), timeout=60) is False  # needs CUDA
            # the CPU worker's: this run's host KV in huge pages, its output still transformers'
            assert ray.get(coord.set_switch.remote("kv_huge_pages", True), timeout=60) is True
            with pytest.raises(ray.exceptions.RayTaskError, match="not one of the executor's switches"):
                ray.get(coord.set_switch.remote("early_post", True), timeout=60)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(max_tokens=10, ignore_eos=True))
        stats = llm.last_stats
    assert [o.outputs[0].token_ids for o in outs] == want
    assert (stats["early_posts"] > 0) == bool(on)


def _injector():
    """A function for `__ray_call__`, made inside this one so that Ray pickles it by value
    (the workers cannot import test modules)."""

    def _inject(self, where: str, layer: int, exc: str):
        """In an actor's process: its next call at `layer` of a pass raises `exc` (once). where:
        worker (attention), executor (a verification layer), join (a joining prefill in a pass),
        begin (a pass's start on the executor, any layer), merge (rows joining a batch: the
        draft engine's merge, once the executor's has begun)."""
        import torch

        name = {"worker": "_attend", "executor": "_pre", "join": "_prefill_layer", "begin": "_verify_begin",
                "merge": "merge"}[where]
        if where == "merge":
            self = self.runner
        run, left = getattr(self, name), [1]

        def failing(*args):
            j = args[3] if where == "join" else args[1] if where in ("worker", "executor") else layer
            if j == layer and left and (where != "join" or args[4]):
                left.pop()
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB.") if exc == "oom" \
                    else RuntimeError(f"injected {where} failure")
            return run(*args)

        setattr(self, name, failing)

    return _inject


@pytest.mark.parametrize("where,exc,match,bell", [
    ("worker", "runtime", "RuntimeError: injected worker failure", True),
    ("worker", "runtime", "RuntimeError: injected worker failure", False),  # Ray's hand-offs
    # a pass that never began used to leave the worker waiting on its doorbell for ever
    ("begin", "runtime", "RuntimeError: injected begin failure", True),
])
def test_a_failure_mid_pass_is_reported_as_itself(ray_session, tiny_dir, where, exc, match, bell):
    """The calls queued behind the failure stop waiting (PeerFailed); the user sees the failure
    itself, at once, and the same LLM then generates exactly: the weight slots the failed pass
    held are free again (on the CPU the streamer keeps the same slot ledger as on a GPU)."""
    import ray
    from hf_reference import PROMPTS, hf_greedy
    from specoffload.actors.supervisor import actors
    from specoffload.configs.sampling_params import SamplingParams
    from specoffload.errors import SpecOffloadError
    from specoffload.llm import LLM
    from specoffload.placement.plan import Plan

    d = tiny_dir("llama")
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    want = hf_greedy(d, PROMPTS, 8)
    with LLM(str(d), plan=Plan(device="cpu", layer_doorbell=bell), batch_size=4, progress=False) as llm:
        h = actors(llm.run_id)
        ray.get(h["cpu_attention" if where == "worker" else "gpu_executor"].__ray_call__.remote(_injector(), where, 1, exc),
                timeout=60)
        t0 = time.perf_counter()
        with pytest.raises(SpecOffloadError, match=match) as e:
            llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
        assert "other side of the pass" not in str(e.value)
        assert time.perf_counter() - t0 < 60
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
        assert [o.outputs[0].token_ids for o in outs] == want


def test_a_joining_prefill_that_fails_in_a_pass_is_reported_and_frees_its_slots(ray_session, tiny_dir):
    """Rows joining a running batch prefill inside its pass (one more part of each layer). One
    of those calls failing must not keep the layer's slot: the user sees that failure, and the
    same LLM then generates exactly (3 layers streamed through 2 slots)."""
    import ray
    from hf_reference import PROMPTS, hf_greedy
    from specoffload.actors.supervisor import actors
    from specoffload.configs.sampling_params import SamplingParams
    from specoffload.errors import SpecOffloadError
    from specoffload.llm import LLM
    from specoffload.placement.plan import Plan

    d = tiny_dir("llama")
    lengths = [3, 9, 6, 6]  # row 0 ends first: request 2 joins the running batch inside a pass
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in lengths]
    want = [w[:n] for w, n in zip(hf_greedy(d, PROMPTS, max(lengths)), lengths)]
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    with LLM(str(d), plan=Plan(device="cpu", layer_doorbell=True, num_slots=2), batch_size=2, progress=False,
             draft="self:1", schedule="single", k=2, refill=True) as llm:
        ray.get(actors(llm.run_id)["gpu_executor"].__ray_call__.remote(_injector(), "join", 1, "runtime"), timeout=60)
        with pytest.raises(SpecOffloadError, match="RuntimeError: injected join failure"):
            llm.generate(prompts, params)
        outs = llm.generate(prompts, params)
        assert llm.last_stats["joins"] > 0
    assert [o.outputs[0].token_ids for o in outs] == want


def test_a_joining_prefill_out_of_gpu_memory_waits_and_joins_smaller(ray_session, tiny_dir):
    """What w1-long met on the H200 (session 19): two rows' joining prefill inside a pass ran
    out of GPU memory. The pass goes on, the two requests wait and join one at a time, and
    the run ends with transformers' output for every request."""
    import ray
    from hf_reference import PROMPTS, hf_greedy
    from specoffload.actors.supervisor import actors
    from specoffload.configs.sampling_params import SamplingParams
    from specoffload.llm import LLM
    from specoffload.placement.plan import Plan

    d = tiny_dir("llama")
    prompts = PROMPTS + [PROMPTS[0][:6]]
    lengths = [3, 3, 9, 6, 6]  # rows 0 and 1 end together while row 2 runs on: a join of two rides its pass
    full = hf_greedy(d, prompts, max(lengths))
    with LLM(str(d), plan=Plan(device="cpu", layer_doorbell=True, num_slots=2), batch_size=3, progress=False,
             draft="self:1", schedule="single", k=2, refill=True) as llm:
        ray.get(actors(llm.run_id)["gpu_executor"].__ray_call__.remote(_injector(), "join", 1, "oom"), timeout=60)
        # (the generator runs in the coordinator actor: its warning goes to the actor's log)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            [SamplingParams(max_tokens=n, ignore_eos=True) for n in lengths])
        stats = llm.last_stats
    assert stats["join_retreats"] == 1 and stats["joins"] == 2
    assert [o.outputs[0].token_ids for o in outs] == [f[:n] for f, n in zip(full, lengths)]


@pytest.mark.parametrize("where,gpu_rows,change,what", [
    ("executor", 0, "batch 1 (was 2)", "a verification pass ran out of GPU memory at layer 1"),
    ("merge", 2, "1 GPU rows (was 2)", "rows joining batch 0 ran out of GPU memory"),
])
def test_out_of_gpu_memory_mid_run_restarts_smaller_and_output_is_exact(ray_session, tiny_dir, capfd, where,
                                                                       gpu_rows, change, what):
    """What w1-long met on the GPU: a verification pass (the H200, session 30) or the draft's
    part of a merge (the H100, session 29) ran out of GPU memory mid-run. The merge used to
    leave the batch half merged and the run hung; then either ended the run, losing a job's
    unfinished requests. Now the driver rebuilds the actors with half the GPU rows, or with
    none, half the batch, and runs what had not finished: each request once, transformers'
    greedy tokens, the LLM keeping the smaller footprint."""
    import ray
    from hf_reference import PROMPTS, hf_greedy
    from specoffload.actors.supervisor import actors
    from specoffload.configs.sampling_params import SamplingParams
    from specoffload.llm import LLM
    from specoffload.placement.plan import Plan

    d = tiny_dir("llama")
    lengths = [3, 9, 6, 6]  # row 0 ends first: request 2 joins the running batch
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in lengths]
    want = [w[:n] for w, n in zip(hf_greedy(d, PROMPTS, max(lengths)), lengths)]
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    with LLM(str(d), plan=Plan(device="cpu", layer_doorbell=True), batch_size=2, progress=False,
             draft="self:1", schedule="single", k=2, refill=True, gpu_kv_rows=gpu_rows) as llm:
        ray.get(actors(llm.run_id)["gpu_executor"].__ray_call__.remote(_injector(), where, 1 if where == "executor"
                                                                         else 0, "oom"), timeout=60)
        outs = llm.generate(prompts, params)
        st = llm.last_stats
        assert (st["restarts"], st["shrunk"]) == (1, [change])
        assert (llm.plan.gpu_kv_rows, llm.run_cfg.batch_size) == ((1, 2) if gpu_rows else (0, 1))
    assert [o.outputs[0].token_ids for o in outs] == want
    err = capfd.readouterr().err
    assert f"specoffload: {what}" in err and f"restarting the actors with {change}" in err


def test_out_of_gpu_memory_past_the_restarts_ends_the_run_in_one_line(ray_session, tiny_dir):
    """With no restart left the run ends at once (the merge's failure used to hang it) with the
    out-of-memory in one line, a CapacityError the user can act on, saying what was kept."""
    import ray
    from hf_reference import PROMPTS
    from specoffload.actors.supervisor import actors
    from specoffload.configs.sampling_params import SamplingParams
    from specoffload.errors import OutOfGpuMemoryMidRun
    from specoffload.llm import LLM
    from specoffload.placement.plan import Plan

    d = tiny_dir("llama")
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in [3, 9, 6, 6]]
    with LLM(str(d), plan=Plan(device="cpu", layer_doorbell=True), batch_size=2, progress=False,
             draft="self:1", schedule="single", k=2, refill=True) as llm:
        llm.max_restarts = 0
        ray.get(actors(llm.run_id)["gpu_executor"].__ray_call__.remote(_injector(), "merge", 0, "oom"), timeout=60)
        t0 = time.perf_counter()
        with pytest.raises(OutOfGpuMemoryMidRun, match=r"^rows joining batch 0 ran out of GPU memory \(.*GiB held\), "
                           r"1 time in one run; stopped with [1-3] of 4 requests finished \(those are kept\): lower "
                           r"batch_size or gpu_kv_rows, or raise gpu_memory$") as e:
            llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
        assert "\n" not in str(e.value).strip() and time.perf_counter() - t0 < 60
