"""The coordinator actor: builds the other three actors and runs the generation loop.

It follows the plan (placement, batch sizes) and the run settings (schedule, draft
length), sequencing batches through the executor and the CPU worker via object refs.
It is a threaded actor so the driver can poll finished requests while a run is going.
"""

from __future__ import annotations

import threading
import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..configs.run_config import RunConfig
from ..configs.sampling_params import SamplingParams
from ..errors import CapacityError, from_actor_init
from ..placement.node import pick_node
from ..placement.plan import Plan
from ..scheduler.generator import Generator
from ..scheduler.request import Request
from ..stop_strings import decoder
from .actor_backend import ActorBackend, PassStalled, RunStopped
from .cpu_attention import CPUAttention
from .gpu_executor import GPUExecutor
from .guard import guarded
from .io_loader import IOLoader
from .metrics import RunMetrics
from .supervisor import pid_of

ACTOR_NAMES = ("io_loader", "gpu_executor", "cpu_attention")


def wait_ready(coordinator, run_id: str) -> dict:
    """The started actors' facts, once the coordinator and the actors it builds are up. One
    that refused to start raises its own error (a CapacityError, say: `guard.user_error`, one
    line naming the actors' log) instead of Ray's, and a failed or interrupted start leaves
    nothing behind: the coordinator and its actors are killed and the run's /dev/shm files
    removed (a failed run once left 514 MB there)."""
    from .guard import user_error
    from .io_loader import remove_local_run_dir

    try:
        return ray.get(coordinator.ready.remote())
    except BaseException as e:  # an actor's error, Ctrl-C, the driver shutting down
        _kill_run(coordinator, run_id)
        remove_local_run_dir(run_id)
        if isinstance(e, ray.exceptions.RayError):
            raise user_error(e, run_id) from None
        raise


def _kill_run(coordinator, run_id: str):
    """Kill the coordinator (the actors it built die with it) and the loader itself, and wait
    until the loader is gone: ray.kill returns at once, and a loader still writing a layer
    would leave its file behind after the run's folder was removed."""
    loader = None
    try:
        loader = ray.get_actor(f"specoffload-io_loader-{run_id}")
    except Exception:  # noqa: BLE001 - not started, or gone
        pass
    for a in (coordinator, loader):
        if a is not None:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass
    if loader is not None:
        try:
            ray.get(loader.ready.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - RayActorError: it is dead
            pass


def _kill_and_wait(actor, timeout: float = 60.0):
    """ray.kill returns at once; wait until Ray reports the actor's process gone."""
    ray.kill(actor)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            return
        except Exception:  # noqa: BLE001 - a timeout: ask again
            pass
        time.sleep(0.2)


class Coordinator:
    def __init__(self, target_desc, spec, plan: Plan, draft_desc, run_cfg: RunConfig, run_id: str,
                 progress: bool = True, fallbacks: tuple = ()):
        """fallbacks: (Plan, RunConfig) pairs tried in order when the executor cannot start
        under `plan` for want of GPU memory (the planner's next candidates; they must keep the
        same layers on disk, since the host copy is loaded once)."""
        self.spec, self.plan, self.run_cfg, self.run_id = spec, plan, run_cfg, run_id
        self.loader = self.executor = self.attention = None
        try:
            self._start(target_desc, spec, plan, draft_desc, run_cfg, progress, fallbacks)
        except BaseException:
            self._abandon()
            raise
        self._finished, self._lock = [], threading.Lock()
        self.tokenizer = None  # set_tokenizer: sent by the driver when stop strings first need it
        self._progress = {}
        self.metrics = RunMetrics(run_id, spec.num_layers, self.executor, self.attention)

    def _start(self, target_desc, spec, plan: Plan, draft_desc, run_cfg: RunConfig, progress: bool, fallbacks):
        cuda, run_id = plan.device == "cuda", self.run_id
        self._name = lambda role: f"specoffload-{role}-{run_id}"  # noqa: E731
        # Each actor's errors reach the caller as its own, its traceback in the run's log
        # (guard.py), rather than on the driver's terminal.
        self._actor = lambda cls, role: ray.remote(guarded(cls, role, run_id))  # noqa: E731
        # One host for all three: they share /dev/shm files (placement/node.py).
        node = pick_node(ray.nodes(), ray.get_runtime_context().get_node_id(), cuda)
        self._here = NodeAffinitySchedulingStrategy(node, soft=False)
        self.loader = self._actor(IOLoader, "io_loader").options(
            name=self._name("io_loader"), num_cpus=0, scheduling_strategy=self._here).remote(target_desc, run_id)
        host_layers = [j for j in range(spec.num_layers) if j not in plan.disk_layers]
        t0, t_wall = time.perf_counter(), time.time()  # the loader's "up" is a wall-clock time (same node)
        load = self.loader.load.remote(host_layers, progress)
        # Meanwhile the other two start: the executor's CUDA start and draft load overlap
        # the loader's (a 7B draft's load was a fifth of a GPU-check run's start).
        self.attention = self._actor(CPUAttention, "cpu_attention").options(
            name=self._name("cpu_attention"), num_cpus=plan.attention_cpus, scheduling_strategy=self._here
        ).remote(spec, plan.attention_threads, plan.kv_dtype, plan.trace, plan.ragged_attention,
                  plan.cpu_query_rows, plan.kv_huge_pages, plan.keep_freed_memory)
        tries = [(plan, run_cfg), *[f for f in fallbacks if f[0].disk_layers == plan.disk_layers]]
        self.executor = self._new_executor(plan, draft_desc, target_desc)
        manifest = ray.get(load)
        load_s = time.perf_counter() - t0
        refused = []  # why the plans tried before the one that started did not
        for n, (p, cfg) in enumerate(tries):
            try:
                if n:  # the first try's executor was started above
                    self.executor = self._new_executor(p, draft_desc, target_desc)
                self.info = self._attach_executor(manifest)
            except ray.exceptions.RayError as e:
                # A guarded executor raises its constructor's error from its next call
                # (RayTaskError); one that died anyway is a RayActorError.
                err = e.cause if isinstance(e, ray.exceptions.RayTaskError) else from_actor_init(e)
                if isinstance(err, CapacityError) and n + 1 < len(tries):
                    refused.append(str(err))
                    continue
                raise err from None
            self.plan, self.run_cfg = p, cfg
            break
        self.info |= {"refused": refused, "plan": self.plan, "run_config": self.run_cfg,
                      # from the start of the host load: the executor's own start overlaps it
                      "executor_start_s": round(time.perf_counter() - t0, 1)}
        self.info["attention_threads"] = ray.get(self.attention.ready.remote())
        # Doorbell waits check their peer's process: the executor writes the worker's pid into
        # each mailbox it makes, so a worker that dies before it maps one is still seen gone.
        ray.get(self.executor.set_worker_pid.remote(ray.get(self.attention.__ray_call__.remote(pid_of))))
        self.info["host_load_s"] = round(load_s, 1)
        lt = manifest.get("times_s", {})  # where the host load went (the start line prints it)
        self.info["host_parts_s"] = {"up": round(lt["up"] - t_wall, 1), "read": lt["read"], "write": lt["write"],
                                     "threads": lt["threads"]} if lt else {}
        self.backend = ActorBackend(self.executor, self.attention, spec.num_layers, self.plan.prefill_batch,
                                    self.plan.micro_batches, self.plan.shm_prefill and self.plan.shm_activations,
                                    self.plan.layer_doorbell and self.info["mailboxes"], self.plan.gpu_kv_rows,
                                    self.plan.stall_s, self.plan.worker_layer_runs, self.plan.join_overlap)

    def _new_executor(self, plan: Plan, draft_desc, target_desc):
        """An executor starting CUDA and loading the draft (attach maps the target later)."""
        cuda = plan.device == "cuda"
        return self._actor(GPUExecutor, "gpu_executor").options(
            name=self._name("gpu_executor"), num_cpus=0 if cuda else 1, num_gpus=1 if cuda else 0,
            scheduling_strategy=self._here).remote(spec=self.spec, plan=plan, draft_desc=draft_desc,
                                                   target_desc=target_desc)

    def _attach_executor(self, manifest) -> dict:
        try:
            ray.get(self.executor.attach.remote(manifest))
            return ray.get(self.executor.ready.remote())
        except ray.exceptions.RayError:
            # Its GPU memory and its name must be free before the next try: a process still
            # holding memory on the card counts against the next executor's cap.
            _kill_and_wait(self.executor)
            self.executor = None
            raise

    def _abandon(self):
        """After a failed start: the loader's files removed, the actors built so far killed (not
        left to die with this one mid-call, which printed `Fatal Python error: Aborted`)."""
        if self.loader is not None:
            try:
                ray.get(self.loader.cleanup.remote(), timeout=60)
            except Exception:  # noqa: BLE001 - the loader failed too; wait_ready removes the folder
                pass
        for a in (self.executor, self.attention, self.loader):
            if a is not None:
                try:
                    ray.kill(a)
                except Exception:  # noqa: BLE001 - already gone
                    pass

    def ready(self) -> dict:
        return self.info

    def generate(self, payload: list[dict]) -> dict:
        """payload: [{rid, prompt_ids, params (dict), eos}] -> run statistics."""
        reqs = []
        for p in payload:
            sp = SamplingParams(**p["params"])
            reqs.append(Request(p["rid"], p["prompt_ids"], sp, tuple(p["eos"]),
                                decode=decoder(self.tokenizer, sp)))

        def done(r):
            with self._lock:
                self._finished.append({"rid": r.rid, "token_ids": list(r.out),
                                       "finish_reason": r.finish_reason, "passes": r.rounds,
                                       "stop_reason": r.stop_reason, "text": r.text, "logprobs": r.logprobs})
            self.metrics.request_finished()

        def progress(stats):
            self._progress = stats.as_dict(log=False)
            self.metrics.progress(self._progress)

        self._running = reqs  # what `partial` reads if an actor dies under this run
        self.backend.reset()
        gen = Generator(self.backend, self.run_cfg, on_finish=done, on_progress=progress)
        self.metrics.run_started(len(reqs))
        try:
            stats = gen.run(reqs).as_dict()
        except RunStopped:
            self.backend.free_all()  # the stopped run's KV (an interrupted notebook may run again)
            return {"stopped": True}
        except Exception as e:
            # A run that failed (a prefill out of GPU memory, say) leaves its batches on the
            # executor and the CPU worker: their device memory, and state under the batch ids the
            # next run starts again from 0. Free them before the next run's calls (an actor runs
            # its calls in order); a dead actor is the supervisor's to rebuild.
            # A stalled pass's actors are stuck: the supervisor rebuilds them (nothing to free).
            if not isinstance(e, (ray.exceptions.RayActorError, PassStalled)):
                self.backend.free_all()
            raise
        stats |= self.backend.stats()
        self.metrics.run_finished(stats)
        return stats

    def set_tokenizer(self, tokenizer):
        """The tokenizer stop strings are matched with (the driver sends it when first needed)."""
        self.tokenizer = tokenizer

    def set_run_config(self, run_cfg: RunConfig):
        """Switch schedule / draft length between runs (benchmarks compare modes in one run)."""
        self.run_cfg = run_cfg

    def set_micro_batches(self, m: int):
        """Micro-batches per target pass from the next pass on (benchmarks compare them)."""
        if m < 1:
            raise ValueError("micro_batches must be >= 1")
        self.backend.M = m

    def set_gpu_kv_rows(self, n: int):
        """GPU rows (plan.gpu_kv_rows) for batches started from the next run on (benchmarks
        compare them on the same actors; the executor allocates them per batch)."""
        if n < 0:
            raise ValueError("gpu_kv_rows must be >= 0")
        self.backend.G = int(n)

    def set_switch(self, name: str, on: bool) -> bool:
        """A plan switch from the next pass on, returning what the actors took; benchmarks
        compare both ways on the same actors. layer_doorbell needs the executor's mailboxes;
        join_overlap is the backend's; kv_huge_pages the CPU worker's (for caches made from the
        next run on); the rest are the executor's (GPUExecutor.set_switch)."""
        if name == "layer_doorbell":
            self.backend.doorbell = bool(on) and self.info["mailboxes"]
            return self.backend.doorbell
        if name == "join_overlap":
            self.backend.join_overlap = bool(on)
            return self.backend.join_overlap
        if name == "kv_huge_pages":
            return ray.get(self.attention.set_huge_pages.remote(bool(on)))
        return ray.get(self.executor.set_switch.remote(name, bool(on)))

    def set_copy_chunk(self, mib: int):
        """The size of the pieces the weight copy is issued in, from the next layer copied on
        (plan.copy_chunk_mib; benchmarks compare sizes on the same actors)."""
        ray.get(self.executor.set_copy_chunk.remote(mib))

    def set_draft_kv(self, kv):
        """Where the draft's KV lives and what it sees (a placement.draft_kv.DraftKV), from the next run on."""
        ray.get(self.executor.set_draft_kv.remote(kv))

    def memory(self) -> dict:
        """The executor's device memory in bytes: allocated now, and the peak so far."""
        return ray.get(self.executor.memory.remote())

    def stats(self) -> dict:
        return self.backend.stats()

    def poll(self) -> tuple[list, dict]:
        """Requests finished since the last poll, and the running statistics."""
        with self._lock:
            out, self._finished = self._finished, []
        return out, dict(self._progress)

    def partial(self) -> list[dict]:
        """The last run's unfinished requests that had generated tokens: each a prefix of its
        output (every token verified by the target), for the supervisor to continue from when
        another actor died under the run (actors/supervisor.py)."""
        out = []
        for r in getattr(self, "_running", []):
            if r.done or not r.out:
                continue
            toks = list(r.out)
            lp = None if r.logprobs is None else list(r.logprobs)[: len(toks)]
            if lp is not None:
                toks = toks[: len(lp)]  # a round being appended when the run ended: its whole tokens only
            out.append({"rid": r.rid, "token_ids": toks, "logprobs": lp, "passes": r.rounds})
        return out

    def host_files(self) -> list[str]:
        """Names of the weight files the loader holds in shared memory."""
        return ray.get(self.loader.files.remote())

    def trace(self) -> dict:
        """Chrome-trace JSON of the stage spans recorded since the last call (plan.trace)."""
        ex, at = ray.get([self.executor.trace_events.remote(), self.attention.trace_events.remote()])
        return {"traceEvents": ex + at, "displayTimeUnit": "ms"}

    def actor_names(self) -> list[str]:
        return [f"specoffload-{r}-{self.run_id}" for r in ACTOR_NAMES]

    def stop(self):
        """End a running `generate` at its next pass boundary (the driver was interrupted), so
        the actors are killed with nothing in flight and Ray logs no failed task."""
        self.backend.stopping = True

    def shutdown(self):
        try:
            # Actors run their tasks in order: these return once everything queued before is done.
            ray.get([self.executor.ready.remote(), self.attention.ready.remote()], timeout=30)
        except Exception:  # noqa: BLE001 - a dead or stuck actor is killed below all the same
            pass
        try:
            ray.get(self.loader.cleanup.remote())
        finally:
            for a in (self.attention, self.loader):
                ray.kill(a)
            # The executor's GPU memory is free once this returns: the next run on the card
            # (this driver's or another's) counts whatever is still held against its cap.
            _kill_and_wait(self.executor)
