"""Surviving an actor that dies mid-run: rebuild the actor set, re-run what had not finished.

The design is the simplest that keeps output exact: when any of the four actors dies (killed,
out of memory, its node lost), the driver collects what the coordinator had finished, tears the
actor set down (its /dev/shm folder with it), starts a fresh one, and submits the requests that
had not finished, from their prompts. A request's output depends only on its prompt, its
parameters and its rid (the sampling seed), never on its batch, so re-running one from scratch
gives what the undisturbed run would have; finished ones were handed out once and are not run
again. Rebuilding KV from prompt + generated tokens would save recomputation, but a run that
loses an actor loses minutes at most against hours of batch, and a from-scratch re-run has no
state to get wrong.

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


def actor_pids(run_id: str) -> dict:
    """role -> pid of the run's actor processes (fault-injection tests kill them by pid)."""
    import os

    import ray

    handles = actors(run_id)
    pids = ray.get([h.__ray_call__.remote(lambda self: os.getpid()) for h in handles.values()], timeout=60)
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


def supervised_generate(llm, reqs: list, finished, progress, log=None) -> dict:
    """LLM._generate_ray with restarts: run `reqs` on the actors; when one dies, rebuild and
    re-run the requests not finished. Each request reaches `finished` exactly once."""
    log = log or sys.stderr
    pending = {r.rid: r for r in reqs}
    order = [r.rid for r in reqs]

    def fin(r):
        if pending.pop(r.rid, None) is not None:  # at most once, whatever the restarts
            finished(r)

    def deliver(o):
        r = pending.get(o["rid"])
        if r is not None:  # as LLM._run_ray's drain does
            r.out, r.finish_reason, r.rounds = o["token_ids"], o["finish_reason"], o["passes"]
            for k in ("stop_reason", "text", "logprobs"):
                if k in o:
                    setattr(r, k, o[k])
            fin(r)

    import ray

    from .guard import user_error

    restarts = 0
    while True:
        try:
            stats = llm._run_ray([pending[rid] for rid in order if rid in pending], fin, progress)
            stats["restarts"] = restarts
            return stats
        except Exception as e:
            if not _actor_died(e):
                if isinstance(e, ray.exceptions.RayError):  # an actor's error: one line, traceback in its log
                    raise user_error(e, llm.run_id) from None
                raise
            _collect_finished(llm, deliver)
            who, old = _who(e), llm.run_id
            teardown(old)
            llm.coordinator = None
            if restarts >= llm.max_restarts:
                raise EngineFailed(
                    f"the engine's {who} actor died {restarts + 1} times in one run; stopped with "
                    f"{len(reqs) - len(pending)} of {len(reqs)} requests finished (those are kept)") from None
            restarts += 1
            print(f"specoffload: the engine's {who} actor died; restarting the actors and re-running "
                  f"{len(pending)} unfinished requests (restart {restarts} of at most {llm.max_restarts})",
                  file=log, flush=True)
            try:
                llm._start_ray(getattr(llm, "_ray_address", None))
            except Exception as e2:  # noqa: BLE001 - any failure to come back ends the run
                msg = str(getattr(e2, "cause", None) or e2).strip().splitlines()
                raise EngineFailed(
                    f"the engine's {who} actor died and the actors could not restart "
                    f"({msg[-1] if msg else type(e2).__name__}); {len(reqs) - len(pending)} of {len(reqs)} "
                    f"requests finished (those are kept)") from None
