"""Surviving an actor that dies mid-run: rebuild the actor set, carry on with what had not finished.

When any of the four actors dies (killed, out of memory, its node lost), the driver collects
what the coordinator had finished and, if the coordinator still answers, the tokens each
unfinished request had generated; it tears the actor set down (its /dev/shm folder with it),
starts a fresh one (weights from the checkpoint) and submits the requests that had not finished.
A greedy request that had generated tokens continues from them: its prompt plus those tokens is
prefilled (the KV rebuilt by recomputation) and it generates the rest, which is what the
undisturbed run would have generated, since greedy output depends only on the sequence so far.
The others re-run from their prompts: a sampled request's tokens depend on its generator's
draws and, under speculation, on the draft's proposals, which a rebuilt draft need not repeat;
from scratch its output depends only on its prompt, parameters and rid (the seed), never on its
batch. Stop strings and presence/frequency penalties (which look at the output alone) re-run
too. Finished requests were handed out once and are not run again.

A pass or a join that runs out of GPU memory mid-run (`OutOfGpuMemoryMidRun`) is met the same
way, the new actor set with half the GPU rows or half the batch (actors/memory_retreat.py);
past the restarts it ends the run as that CapacityError, which the user can act on.

When the actors cannot be restarted, or die more than `LLM.max_restarts` times in one generate,
the run ends with `EngineFailed`: one line; what finished was already handed to `on_output`
(the CLI's journal holds it).
"""

from __future__ import annotations

import re
import sys

from ..errors import ActorError

ROLES = ("coordinator", "io_loader", "gpu_executor", "cpu_attention")


class EngineFailed(ActorError):
    """The actors died and could not be brought back. Not the user's input: exit status 1."""


def _actor_died(e: BaseException) -> bool:
    import ray

    return isinstance(e, ray.exceptions.RayActorError) or isinstance(getattr(e, "cause", None),
                                                                       ray.exceptions.RayActorError)


def _stalled(e: BaseException) -> bool:
    """e is a pass that stalled (actor_backend.PassStalled, raised in the coordinator)."""
    from ..errors import root_cause
    from .actor_backend import PassStalled

    return isinstance(root_cause(e), PassStalled)


def _out_of_gpu_memory(e: BaseException) -> bool:
    """e is a pass or a merge that ran out of GPU memory mid-run (actors/memory_retreat.py)."""
    from ..errors import OutOfGpuMemoryMidRun, root_cause

    return isinstance(root_cause(e), OutOfGpuMemoryMidRun)


def _who(e: BaseException) -> str:
    m = re.search(r"specoffload-(coordinator|io_loader|gpu_executor|cpu_attention)-", str(e))
    if m:
        return m.group(1)
    m = re.search(r"class_name: (\w+)", str(e))
    return m.group(1) if m else "an"


def actors(run_id: str) -> dict:
    """role -> the run's named actor handle (roles whose actor is gone are left out)."""
    import ray

    out = {}
    for role in ROLES:
        try:
            out[role] = ray.get_actor(f"specoffload-{role}-{run_id}")
        except ValueError:
            pass
    return out


def pid_of(_actor) -> int:
    """An actor's process id, run inside it: `handle.__ray_call__.remote(pid_of)`."""
    import os

    return os.getpid()


def actor_pids(run_id: str) -> dict:
    """role -> pid of the run's actor processes (fault-injection tests kill them by pid)."""
    import ray

    handles = actors(run_id)
    pids = ray.get([h.__ray_call__.remote(pid_of) for h in handles.values()], timeout=60)
    return dict(zip(handles, pids))


def teardown(run_id: str):
    """Kill what is left of a run's actors and remove its /dev/shm folder (on this node)."""
    import ray

    from .io_loader import remove_local_run_dir

    for h in actors(run_id).values():
        try:
            ray.kill(h)
        except Exception:  # noqa: BLE001 - already dead
            pass
    remove_local_run_dir(run_id)


def _collect_finished(llm, deliver):
    """Requests the coordinator finished but the driver has not polled yet, if it still answers."""
    import ray

    try:
        outs, _ = ray.get(llm.coordinator.poll.remote(), timeout=10)
    except Exception:  # noqa: BLE001 - the coordinator is the one that died: they re-run
        return
    for o in outs:
        deliver(o)


def _collect_partial(llm) -> dict:
    """rid -> the tokens (and log probabilities, passes) an unfinished request had generated,
    if the coordinator still answers."""
    import ray

    try:
        return {p["rid"]: p for p in ray.get(llm.coordinator.partial.remote(), timeout=10)}
    except Exception:  # noqa: BLE001 - the coordinator is the one that died: they re-run
        return {}


def can_continue(r) -> bool:
    """Whether request r's output so far can be kept and its KV rebuilt from prompt + output:
    greedy, and nothing that reads the output apart from the prompt (stop strings, presence and
    frequency penalties). Repetition penalty counts prompt and output alike, so it may."""
    p = r.params
    return p.greedy and not p.stop and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0


class _Prefix:
    """What a continued request had generated before its restarts."""

    def __init__(self):
        self.tokens, self.logprobs, self.passes = [], [], 0

    def add(self, part: dict):
        self.tokens += part["token_ids"]
        self.logprobs += part["logprobs"] or []
        self.passes += part["passes"]


def _continuation(r, prefix: _Prefix):
    """Request r from where it stopped: its prompt plus the tokens kept, for what is left."""
    from dataclasses import replace

    n = len(prefix.tokens)
    params = replace(r.params, max_tokens=r.params.max_tokens - n, min_tokens=max(r.params.min_tokens - n, 0))
    return replace(r, prompt_ids=list(r.prompt_ids) + prefix.tokens, params=params, out=[], logprobs=None,
                   finish_reason=None, rounds=0, stop_reason=None, text=None)


def supervised_generate(llm, reqs: list, finished, progress, log=None) -> dict:
    """LLM._generate_ray with restarts: run `reqs` on the actors; when one dies, rebuild and
    carry on with the requests not finished (greedy ones from their tokens so far). Each
    request reaches `finished` exactly once, as itself."""
    log = log or sys.stderr
    pending = {r.rid: r for r in reqs}
    order = [r.rid for r in reqs]
    prefixes: dict = {}  # rid -> _Prefix of a request continued after a restart
    running: dict = {}  # rid -> the Request object the current actor set runs (a continuation or r)

    def fin(done):
        r = pending.pop(done.rid, None)
        if r is None:  # at most once, whatever the restarts
            return
        pre = prefixes.get(done.rid)
        if pre is not None:  # a continuation: the request is the prefix and what followed
            r.out = pre.tokens + list(done.out)
            if r.logprobs is not None:
                r.logprobs = pre.logprobs + list(done.logprobs or [])
            r.finish_reason, r.rounds = done.finish_reason, pre.passes + done.rounds
            r.stop_reason, r.text = done.stop_reason, done.text
            done = r
        finished(done)

    def deliver(o):
        r = running.get(o["rid"]) if o["rid"] in pending else None
        if r is not None:  # as LLM._run_ray's drain does, on the object the actors ran
            r.out, r.finish_reason, r.rounds = o["token_ids"], o["finish_reason"], o["passes"]
            for k in ("stop_reason", "text", "logprobs"):
                if k in o:
                    setattr(r, k, o[k])
            fin(r)

    import ray

    from ..errors import root_cause
    from .guard import user_error

    from . import memory_retreat

    restarts, continued, shrunk = 0, 0, []
    while True:
        running = {rid: (_continuation(pending[rid], prefixes[rid]) if rid in prefixes else pending[rid])
                   for rid in order if rid in pending}
        try:
            stats = llm._run_ray(list(running.values()), fin, progress)
            stats["restarts"], stats["continued"], stats["shrunk"] = restarts, continued, shrunk
            return stats
        except Exception as e:
            stalled = _stalled(e)
            smaller = memory_retreat.smaller(llm.plan, llm.run_cfg) if _out_of_gpu_memory(e) else None
            if not (_actor_died(e) or stalled or smaller):
                if isinstance(e, ray.exceptions.RayError):  # an actor's error: one line, traceback in its log
                    raise user_error(e, llm.run_id) from None
                raise
            _collect_finished(llm, deliver)
            kept = 0
            for rid, part in _collect_partial(llm).items():
                if rid in pending and can_continue(pending[rid]) and part["token_ids"]:
                    prefixes.setdefault(rid, _Prefix()).add(part)
                    kept += 1
            continued += kept
            who, old = _who(e), llm.run_id
            # a stall or an out-of-memory: what happened, in the raiser's words less its advice
            what = root_cause(e).what if stalled or smaller else f"the engine's {who} actor died"
            teardown(old)  # a stalled run's actors too: one of them is stuck
            llm.coordinator = None
            if restarts >= llm.max_restarts and smaller:  # the user's to act on, as without restarts
                from ..errors import OutOfGpuMemoryMidRun

                times = f"{restarts + 1} time{'s' if restarts else ''}"
                raise OutOfGpuMemoryMidRun(
                    f"{what}, {times} in one run; stopped with {len(reqs) - len(pending)} of {len(reqs)} requests "
                    f"finished (those are kept): lower batch_size or gpu_kv_rows, or raise gpu_memory") from None
            if restarts >= llm.max_restarts:
                again = f"; {restarts + 1} times in one run" if stalled else f" {restarts + 1} times in one run"
                raise EngineFailed(
                    f"{what}{again}; stopped with "
                    f"{len(reqs) - len(pending)} of {len(reqs)} requests finished (those are kept)") from None
            restarts += 1
            change = ""
            if smaller:  # the next actor set runs with less GPU memory in use
                llm.plan, llm.run_cfg, change = smaller
                shrunk.append(change)
                change = f" with {change}"
            print(f"specoffload: {what}; restarting the actors{change} and re-running "
                  f"{len(pending)} unfinished requests, {kept} of them from the tokens they had "
                  f"(restart {restarts} of at most {llm.max_restarts})", file=log, flush=True)
            try:
                llm._start_ray(getattr(llm, "_ray_address", None))
            except Exception as e2:  # noqa: BLE001 - any failure to come back ends the run
                msg = str(getattr(e2, "cause", None) or e2).strip().splitlines()
                raise EngineFailed(
                    f"{what} and the actors could not restart "
                    f"({msg[-1] if msg else type(e2).__name__}); {len(reqs) - len(pending)} of {len(reqs)} "
                    f"requests finished (those are kept)") from None
