"""Fault injection: an actor's process killed (SIGKILL, by pid) mid-run. The driver rebuilds the
actor set and re-runs what had not finished; the output is exactly the undisturbed run's and
every request comes back once (actors/supervisor.py)."""

from __future__ import annotations

import os
import re
import signal

import pytest

from specoffload.actors.supervisor import EngineFailed, actor_pids
from specoffload.configs.sampling_params import SamplingParams
from specoffload.llm import LLM
from specoffload.placement.plan import Plan

# 10 requests, 3 waves of 4: the kill lands after the first finishes, with others in flight.
PROMPTS = [[1] + [3 + (7 * i + 5 * j) % 90 for j in range(2 + 3 * i)] for i in range(10)]
PARAMS = [SamplingParams(max_tokens=4 + 3 * (i % 4), ignore_eos=True,
                         temperature=0.0 if i % 3 else 0.8, seed=100 + i) for i in range(10)]


def _inputs():
    return [{"prompt_token_ids": p} for p in PROMPTS]


@pytest.fixture(scope="module")
def want(tiny_dir):
    ref = LLM(str(tiny_dir("llama")), engine="reference", progress=False, batch_size=4)
    return [o.outputs[0].token_ids for o in ref.generate(_inputs(), PARAMS)]


@pytest.mark.parametrize("role", ["cpu_attention", "gpu_executor", "coordinator", "io_loader"])
def test_killed_actor_is_restarted_and_output_is_exact(ray_session, tiny_dir, want, role, capsys):
    from specoffload.actors.io_loader import run_dir

    with LLM(str(tiny_dir("llama")), plan=Plan(device="cpu", batch_size=4), progress=False) as llm:
        first_run = llm.run_id
        pid = actor_pids(first_run)[role]
        seen, killed = [], []

        def on_output(o):
            seen.append(o.request_id)
            if not killed:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

        outs = llm.generate(_inputs(), PARAMS, on_output=on_output)
        if role == "io_loader":
            # After loading, the loader only holds the folder: the run goes on (the executor maps
            # the files, which outlive it) and shutdown removes them without it.
            assert llm.run_id == first_run and llm.last_stats["restarts"] == 0
        else:
            assert llm.run_id != first_run and llm.last_stats["restarts"] == 1
    assert killed and sorted(seen) == sorted(o.request_id for o in outs)  # each once
    assert [o.outputs[0].token_ids for o in outs] == want
    err = capsys.readouterr().err
    if role != "io_loader":
        assert f"the engine's {role} actor died; restarting the actors and re-running" in err
    assert not run_dir(first_run).exists()  # the dead set's /dev/shm folder went with it


def test_actors_that_keep_dying_end_the_run_in_one_line(ray_session, tiny_dir, want):
    """max_restarts 0: the first death ends the run with EngineFailed; what finished before it
    was handed out (the CLI's journal has it)."""
    with LLM(str(tiny_dir("llama")), plan=Plan(device="cpu", batch_size=4), progress=False) as llm:
        llm.max_restarts = 0
        pid = actor_pids(llm.run_id)["gpu_executor"]
        got = {}

        def on_output(o):
            got[o.request_id] = o.outputs[0].token_ids
            if len(got) == 1:
                os.kill(pid, signal.SIGKILL)

        with pytest.raises(EngineFailed, match=r"gpu_executor actor died 1 times in one run; stopped with \d+ of 10"):
            llm.generate(_inputs(), PARAMS, on_output=on_output)
    assert got and all(want[int(rid)] == toks for rid, toks in got.items())  # request ids are strings, as vLLM's


@pytest.mark.parametrize("role,draft", [("gpu_executor", None), ("cpu_attention", None), ("gpu_executor", "self:1")])
def test_greedy_requests_continue_from_the_tokens_they_had(ray_session, tiny_dir, role, draft, capsys):
    """Killed once every running request has a few tokens: the greedy ones resume from prompt +
    those tokens (KV rebuilt by prefill, the draft's too) instead of from scratch; outputs, log
    probabilities included, are the undisturbed run's; the sampled one re-runs from its prompt."""
    import threading
    import time

    import ray

    prompts = [[1] + [3 + (5 * i + 3 * j) % 90 for j in range(3 + 2 * i)] for i in range(4)]
    params = [SamplingParams(max_tokens=40, ignore_eos=True, logprobs=1,
                             temperature=0.8 if i == 3 else 0.0, seed=7 + i) for i in range(4)]
    inputs = [{"prompt_token_ids": p} for p in prompts]
    # the sampled request's tokens depend on the draft's proposals: its reference drafts alike
    ref = LLM(str(tiny_dir("llama")), draft=draft, engine="reference", progress=False, batch_size=4)
    want = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in ref.generate(inputs, params)]
    with LLM(str(tiny_dir("llama")), draft=draft, plan=Plan(device="cpu", batch_size=4), progress=False) as llm:
        pid, coord = actor_pids(llm.run_id)[role], llm.coordinator
        had = {}

        def kill_when_under_way():
            for _ in range(3000):
                try:
                    parts = ray.get(coord.partial.remote(), timeout=5)
                except Exception:  # noqa: BLE001 - not started yet
                    parts = []
                if len(parts) == 4 and all(len(p["token_ids"]) >= 3 for p in parts):
                    had.update({p["rid"]: len(p["token_ids"]) for p in parts})
                    os.kill(pid, signal.SIGKILL)
                    return
                time.sleep(0.01)

        t = threading.Thread(target=kill_when_under_way, daemon=True)
        t.start()
        outs = llm.generate(inputs, params)
        t.join()
        assert had and llm.last_stats["restarts"] == 1
        assert llm.last_stats["continued"] == 3  # the three greedy ones; the sampled one re-ran
    for o, (toks, lps) in zip(outs, want):
        assert o.outputs[0].token_ids == toks
        assert len(o.outputs[0].logprobs) == len(toks)
        for got, exp in zip(o.outputs[0].logprobs, lps):  # the same tokens listed, values to rounding
            assert got.keys() == exp.keys()
            assert all(abs(got[k].logprob - exp[k].logprob) < 1e-3 for k in got)
    assert "3 of them from the tokens they had" in capsys.readouterr().err


def _hang_once():
    """A function for `__ray_call__` (made here so that Ray pickles it by value): the CPU
    worker's `calls`-th attention call from now on never returns, as a side of a pass that
    waits on something that will not come."""

    def _inject(self, calls: int):
        import time

        run, left = self._attend, [calls]

        def hanging(*args):
            left[0] -= 1
            if left[0] == 0:
                time.sleep(3600)
            return run(*args)

        self._attend = hanging

    return _inject


@pytest.mark.parametrize("bell", [True, False])
def test_a_stalled_pass_is_restarted_and_output_is_exact(ray_session, tiny_dir, want, bell, capsys):
    """A pass whose result does not come within plan.stall_s (session 29 met one on the GPU: a
    worker waiting on a doorbell for ever) ends in PassStalled; the driver rebuilds the actors
    as for a death and the output is exactly the undisturbed run's, each request once."""
    import ray

    from specoffload.actors.supervisor import actors

    with LLM(str(tiny_dir("llama")), plan=Plan(device="cpu", batch_size=4, stall_s=3, layer_doorbell=bell),
             progress=False) as llm:
        first_run = llm.run_id
        ray.get(actors(first_run)["cpu_attention"].__ray_call__.remote(_hang_once(), 40), timeout=60)
        seen = []
        outs = llm.generate(_inputs(), PARAMS, on_output=lambda o: seen.append(o.request_id))
        assert llm.run_id != first_run and llm.last_stats["restarts"] == 1
    assert sorted(seen) == sorted(o.request_id for o in outs)
    assert [o.outputs[0].token_ids for o in outs] == want
    err = capsys.readouterr().err
    assert re.search(r"batch \d+'s target pass gave no result for 3 s; restarting the actors", err), err


def test_plan_stall_s_is_checked():
    from specoffload.errors import ConfigError

    with pytest.raises(ConfigError, match="stall_s must be >= 0"):
        Plan(device="cpu", stall_s=-1)
