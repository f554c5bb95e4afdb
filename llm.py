"""`LLM`: the user's entry point, shaped like vLLM's.

    from specoffload import LLM, SamplingParams
    llm = LLM("path/to/checkpoint", draft="self:8")
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    print(outs[0].outputs[0].text)

By default the work runs on four Ray actors (I/O loader, GPU executor, CPU attention
worker, coordinator); `engine="reference"` runs the plain in-process path instead.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import fields, replace
from pathlib import Path

from .configs.engine_args import EngineArgs
from .configs.sampling_params import SamplingParams
from .errors import CapacityError, CheckpointError, ConfigError
from .models.spec import ModelSpec, load_spec
from .placement.hardware import mem_available as _host_memory_available  # tests patch this name
from .outputs import RequestOutput, completion
from .scheduler.request import Request
from .stop_strings import decoder


def load_tokenizer(model_dir):
    """The checkpoint's tokenizer, or a one-line CheckpointError."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:
        raise CheckpointError(f"{model_dir}: cannot load the tokenizer ({str(e).splitlines()[0]})") from None


def parse_draft(draft, target_layers: int):
    """None | "self:N" | checkpoint folder -> a draft description for the executor."""
    if draft is None:
        return None
    s = str(draft)
    if s.startswith("self:"):
        try:
            n = int(s[5:])
        except ValueError:
            raise ConfigError(f"--draft self:N needs an integer N, got {s!r}") from None
        if not 1 <= n < target_layers:
            raise ConfigError(f"--draft self:N needs 1 <= N < {target_layers} (target layers), got {n}")
        return ("self", n)
    from .sources.hub import resolve_model

    return ("checkpoint", str(resolve_model(s)), None)  # a folder, or a Hub id's cached snapshot


def n_samples(sp: SamplingParams) -> list[SamplingParams]:
    """SamplingParams(n=N) as N single-sample params: seed + j when seeded."""
    if sp.n == 1:
        return [sp]
    return [replace(sp, n=1, seed=None if sp.seed is None else sp.seed + j) for j in range(sp.n)]


def check_same_vocab(target_dir: Path, tok, draft_dir: Path, draft_spec: ModelSpec, target_spec: ModelSpec):
    """A draft must speak the target's tokens: same vocabulary and special tokens."""
    if draft_spec.vocab_size != target_spec.vocab_size:
        raise ConfigError(
            f"draft {draft_dir} has vocab {draft_spec.vocab_size}, target {target_dir} has "
            f"{target_spec.vocab_size}: they need the same tokenizer")
    if any((draft_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        dtok = AutoTokenizer.from_pretrained(str(draft_dir), local_files_only=True)
        if dtok.get_vocab() != tok.get_vocab():
            raise ConfigError(f"draft {draft_dir} and target {target_dir} have different tokenizers")
        if (dtok.eos_token_id, dtok.bos_token_id) != (tok.eos_token_id, tok.bos_token_id):
            raise ConfigError(f"draft {draft_dir} and target {target_dir} disagree on special tokens")


class LLM:
    max_restarts = 3  # actor-set rebuilds allowed in one generate before it gives up (actors/supervisor.py)

    def __init__(self, model=None, draft=None, *, plan=None, engine_args: EngineArgs | None = None,
                 start: bool = True, **kwargs):
        """model: a checkpoint folder (None: the embedded default); draft: None, "self:N" or a
        checkpoint folder; plan: a Plan, a dict, a plan file or "auto" (the planner measures
        this machine and chooses); engine_args, or its fields as keyword arguments (`k=4,
        batch_size=8, ...`; configs/engine_args.py): the rest. `start=False` checks the model,
        draft and plan but starts nothing: `check` the prompts, then `start()` (the CLI fails on
        them before Ray starts and weights load; `generate` starts the engine if need be)."""
        unknown = sorted(set(kwargs) - {f.name for f in fields(EngineArgs)})
        if unknown:
            raise TypeError(f"__init__() got an unexpected keyword argument {unknown[0]!r}")
        args = engine_args if engine_args is not None else EngineArgs()
        self.args = replace(args, **kwargs) if kwargs else args
        self.plan_choice = None  # with plan="auto": the planner's Choice (every candidate it weighed)
        if model is None:
            from .sources.default_model import default_model_dir

            model = default_model_dir()
        from .sources.hub import resolve_model

        self.model_dir = resolve_model(model)  # a folder, or a Hub id's cached snapshot (sources/hub.py)
        self.spec = load_spec(self.model_dir, dtype=self.args.dtype)
        if self.args.quantize:  # stored fp8 from the load on: the planner and host fit count fp8 bytes
            self.spec = replace(self.spec, weights="fp8")
        self.tokenizer = load_tokenizer(self.model_dir)
        self.draft_desc = parse_draft(draft, self.spec.num_layers)
        self.draft_spec = None  # a separate draft checkpoint's (the planner sizes it)
        if self.draft_desc and self.draft_desc[0] == "checkpoint":
            ddir = Path(self.draft_desc[1])
            dspec = self.draft_spec = load_spec(ddir, dtype=self.spec.dtype)
            check_same_vocab(self.model_dir, self.tokenizer, ddir, dspec, self.spec)
            self.draft_desc = ("checkpoint", str(ddir), self.spec.dtype)
        if self.args.engine == "ray":
            # The loader reads the weights in an actor, after Ray starts; a missing shard or a
            # truncated file is found here first, from the files' headers.
            from .models.checkpoint import Checkpoint

            Checkpoint(self.model_dir, dtype=self.spec.dtype)
            if self.draft_desc and self.draft_desc[0] == "checkpoint":
                Checkpoint(self.draft_desc[1], dtype=self.spec.dtype)
        chosen, fallbacks = None, []  # fallbacks: the planner's next candidates, if its choice does not start
        if plan == "auto":  # the planner measures this machine and chooses (placement/planner.py)
            plan, chosen, fallbacks = self._auto_plan()
        self.plan, self.run_cfg = self._settle(plan, chosen)
        # What the caller set stays set in every fallback (EngineArgs over the candidate's options).
        self._fallbacks = [self._settle(fp, o) + (c,) for fp, o, c in fallbacks]
        self.engine, self.progress = self.args.engine, self.args.progress
        self._context = None  # with check(): the longest sequence, which the host memory fit sizes the KV for
        self._next_rid = 0
        self.last_stats: dict = {}
        self._abandoned = None  # an interrupted run's generate ref, ended before the next run or shutdown
        self.started = False
        self.startup: dict = {}  # seconds: where start() went (Ray, host weights, executor and its parts)
        if start:
            self.start()

    def start(self):
        """Start the engine (load the weights; with engine="ray" join or start Ray and start
        the actors). Done by the constructor unless it was given start=False."""
        if self.started:
            return
        t0 = time.perf_counter()
        if self.engine == "reference":
            self._start_reference()
        else:
            # Before the loader writes a byte: what host memory cannot hold goes to disk.
            from .placement.host_fit import fit_fallbacks, fit_for_llm

            self.plan = fit_for_llm(self.spec, self.plan, self.run_cfg.schedule, self.draft_desc, self.args.workload,
                                    self.progress, self._context)
            self._fallbacks = fit_fallbacks(self.spec, self._fallbacks, self.draft_desc, self.args.workload,
                                            self._context)
            self._start_ray(self.args.ray_address)
        self.startup["total_s"] = round(time.perf_counter() - t0, 1)
        self.started = True

    def check(self, prompts, params=None):
        """The errors `generate(prompts, params)` would raise for its input (prompt too long for
        the context, token ids outside the vocabulary, a KV cache host memory cannot hold),
        without running anything: before `start()` they cost no Ray start and no weight load."""
        rid = self._next_rid
        try:
            reqs = self._requests(prompts, params)[0]
            # the longest sequence: the host memory fit at start() sizes the KV cache by it
            self._context = max(len(r.prompt_ids) + r.params.max_tokens for r in reqs) + self.run_cfg.k_max + 2
        finally:
            self._next_rid = rid

    # -- setup -----------------------------------------------------------------------------
    def _auto_plan(self):
        """Measure this machine, plan for the workload (default: 64 requests of 256 prompt
        tokens and 128 new at acceptance 0.7); returns (Plan, run options, fallbacks: (Plan,
        run options, Candidate) of the next candidates that need less GPU memory). The planner
        may choose an fp8 draft where that is faster; draft_fp8 True insists on it."""
        from .placement.hardware import measure
        from .placement.planner import Workload, plan, to_plan

        a = self.args
        workload = a.workload or Workload(min(256, self.spec.max_positions // 2),
                                          min(128, self.spec.max_positions // 4), a.batch_size or 64)
        self_layers = self.draft_desc[1] if self.draft_desc and self.draft_desc[0] == "self" else 0
        choice = plan(self.spec, self.draft_spec, measure(a.device, a.gpu_memory), workload,
                      self_layers=self_layers, draft_fp8=True if a.draft_fp8 else None)
        self.plan_choice = choice
        fallbacks = [(to_plan(c, self.spec, choice.hardware), choice.run_options(c), c)
                     for c in choice.fallbacks()]
        return choice.plan, choice.run_options(), fallbacks  # plan_from applies an explicit batch_size

    def _settle(self, plan, chosen: dict | None = None):
        """(Plan, RunConfig) of a plan (a file, dict, Plan or None) and the planner's run options
        (`chosen`), with this LLM's arguments over them."""
        p = self.args.plan_from(plan, self.spec.num_layers)
        if p.draft_fp8 and not (self.draft_desc and self.draft_desc[0] == "checkpoint"):
            from .models.fp8_weights import SELF_DRAFT_REFUSAL

            raise ConfigError(SELF_DRAFT_REFUSAL)
        return p, self.args.run_config(p.batch_size, self.draft_desc is not None, chosen)

    def _target_desc(self) -> tuple:
        """The target as actors open it (sources/open.py), quantized at load if asked."""
        return ("checkpoint", str(self.model_dir), self.spec.dtype, self.args.quantize)

    def _start_reference(self):
        from .models.checkpoint import Checkpoint
        from .models.resident import ResidentModel
        from .scheduler.reference_backend import ReferenceBackend
        from .sources.open import open_source

        dev = "cuda" if self.plan.device == "cuda" else "cpu"
        target = ResidentModel.from_source(open_source(self._target_desc()), dev)
        draft, desc = None, self._draft_to_load()
        if desc and desc[0] == "self":
            n = desc[1]
            draft = ResidentModel(self.spec.with_layers(n), target.glob, target.layers[:n], dev)
        elif desc:
            draft = ResidentModel.from_source(Checkpoint(desc[1], dtype=self.spec.dtype), dev,
                                              fp8_weights=self.plan.draft_fp8)
        self.backend = ReferenceBackend(target, draft, self.plan.draft_kv_policy)

    def _draft_to_load(self):
        """The draft to load (the executor's, or the reference engine's): none where neither
        the plan nor a fallback speculates (--plan auto may choose plain decoding; a 7B draft
        would only cost its load and memory)."""
        cfgs = [self.run_cfg, *(cfg for _, cfg, _ in self._fallbacks)]
        return self.draft_desc if any(c.speculative for c in cfgs) else None

    def _start_ray(self, address):
        import ray

        from .actors.coordinator import Coordinator, wait_ready
        from .actors import shm_owners
        from .actors.guard import guarded
        from .placement.node import pick_node
        from .ray_env import check_cluster, ensure_ray

        shm_owners.prepare(self.spec, self.plan)  # dead runs' /dev/shm folders go; the weights must fit
        t0 = time.perf_counter()
        ensure_ray(address, dashboard=self.args.dashboard)
        t_ray = time.perf_counter() - t0
        # The coordinator pins the actors to one node; fail here, before any actor starts,
        # when no node can hold the executor, or when that node runs another specoffload.
        here = ray.get_runtime_context().get_node_id()
        node = pick_node(ray.nodes(), here, self.plan.device == "cuda")
        check_cluster(node)
        self.run_id = uuid.uuid4().hex[:8]
        if node == here:  # the driver owns the folder too: killed, its run's files are stale
            from .actors.io_loader import run_dir

            shm_owners.claim(run_dir(self.run_id), "driver")
        self.coordinator = ray.remote(guarded(Coordinator, "coordinator", self.run_id)).options(
            name=f"specoffload-coordinator-{self.run_id}", num_cpus=0, max_concurrency=2
        ).remote(self._target_desc(), self.spec, self.plan,
                 self._draft_to_load(), self.run_cfg, self.run_id, self.progress,
                 tuple((p, cfg) for p, cfg, _ in self._fallbacks))
        self._coordinator_has_tokenizer = False  # a new coordinator (a restart too) is sent it when needed
        self.info = wait_ready(self.coordinator, self.run_id)
        # host weights and the executor's own work run side by side; actors_s: both done
        self.startup = {"ray_s": round(t_ray, 1), "host_weights_s": self.info.get("host_load_s"),
                        "executor_s": self.info.get("init_s"), "actors_s": self.info.get("executor_start_s"),
                        "executor_parts_s": self.info.get("init_parts_s", {}),
                        "host_parts_s": self.info.get("host_parts_s", {})}
        self.refused = self.info.pop("refused", [])
        if self.refused:  # a fallback started: the run follows it
            started = self.info["plan"], self.info["run_config"]
            for p, cfg, c in self._fallbacks:
                if (p, cfg) == started:
                    self.plan, self.run_cfg = p, cfg
                    self.plan_choice = replace(self.plan_choice, best=c)
        # The loader's /dev/shm files hold the whole target: never leave them behind because a
        # script forgot shutdown() (at exit Ray kills the actors before they could clean up).
        import atexit
        import weakref

        if not getattr(self, "_atexit", False):  # once, however often the actors restart
            self._atexit = True
            ref = weakref.ref(self)
            atexit.register(lambda: ref() is not None and ref().shutdown())

    # -- requests --------------------------------------------------------------------------
    def _requests(self, prompts, params) -> tuple[list[Request], list, list]:
        """Requests (n per prompt for SamplingParams(n=...)), each one's prompt text, and the
        request ids of each prompt's samples."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if params is None:
            params = SamplingParams()
        plist = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ConfigError(f"{len(plist)} SamplingParams for {len(prompts)} prompts")
        if not all(isinstance(sp, SamplingParams) for sp in plist):
            raise ConfigError("sampling_params must be a SamplingParams or a list of them, one per prompt")
        eos = set(self.spec.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        reqs, texts, groups = [], [], []
        for i, (p, sp) in enumerate(zip(prompts, plist)):
            if isinstance(p, dict):
                if "prompt_token_ids" in p:
                    ids, text = [int(t) for t in p["prompt_token_ids"]], p.get("prompt")
                elif "prompt" in p:
                    text = p["prompt"]
                    ids = self.tokenizer(text)["input_ids"]
                else:
                    raise ConfigError(f"prompt {i}: a dict prompt needs 'prompt' or 'prompt_token_ids'")
            elif isinstance(p, str):
                text, ids = p, self.tokenizer(p)["input_ids"]
            else:
                raise ConfigError(f"prompt {i}: expected a string or a dict, got {type(p).__name__}")
            if not ids:
                raise ConfigError(f"prompt {i} is empty")
            if any(not 0 <= t < self.spec.vocab_size for t in ids):
                raise ConfigError(f"prompt {i} has token ids outside the vocabulary (0..{self.spec.vocab_size - 1})")
            if len(ids) + sp.max_tokens > self.spec.max_positions:
                raise CapacityError(
                    f"prompt {i} has {len(ids)} tokens + max_tokens {sp.max_tokens} > the model's "
                    f"context of {self.spec.max_positions}")
            group = []
            for j, one in enumerate(n_samples(sp)):
                # n samples: n requests sharing the prompt, each with its own generator
                # (seed + j when seeded, else derived from its request id).
                reqs.append(Request(self._next_rid, ids, one, tuple(sorted(eos)), decode=decoder(self.tokenizer, one)))
                texts.append(text)
                group.append(self._next_rid)
                self._next_rid += 1
            groups.append(group)
        self._check_host_memory(reqs)
        return reqs, texts, groups

    def _check_host_memory(self, reqs):
        import torch

        n = min(len(reqs), self.plan.batch_size) * (2 if self.run_cfg.schedule == "dual" else 1)
        longest = max(len(r.prompt_ids) + r.params.max_tokens for r in reqs) + self.run_cfg.k_max + 2
        itemsize = torch.empty((), dtype=getattr(torch, self.plan.kv_dtype or self.spec.dtype)).element_size()
        need = n * longest * self.spec.kv_bytes_per_token // self.spec.torch_dtype.itemsize * itemsize
        free = _host_memory_available()
        if need > free:
            raise CapacityError(
                f"the target KV cache for {n} sequences x {longest} tokens needs {need / 2**30:.1f} GiB of "
                f"host memory and {free / 2**30:.1f} GiB is available; lower batch_size or max_tokens")

    def _output(self, rs: list[Request], text) -> RequestOutput:
        """One prompt's RequestOutput: its n samples as outputs[0..n-1]."""
        tokens, rounds = sum(len(r.out) for r in rs), sum(r.rounds for r in rs)
        return RequestOutput(str(rs[0].rid), text, list(rs[0].prompt_ids),
                             [completion(j, r, self.tokenizer) for j, r in enumerate(rs)],
                             metrics={"passes": rounds, "tokens": tokens,
                                      "tokens_per_pass": round(tokens / max(rounds, 1), 3)})

    def generate(self, prompts, sampling_params=None, use_tqdm: bool | None = None, on_output=None, *,
                 params=None) -> list[RequestOutput]:
        """One output per prompt, in prompt order, as vLLM's `LLM.generate`: prompts are strings,
        {"prompt": text} or {"prompt_token_ids": [...]}; sampling_params one SamplingParams or a
        list, one per prompt (`params=` is its old name). `on_output(RequestOutput)` is called
        as each prompt's requests finish (the CLI writes results as they come)."""
        if params is not None:
            if sampling_params is not None:
                raise ConfigError("pass sampling_params or params (its old name), not both")
            sampling_params = params
        reqs, texts, groups = self._requests(prompts, sampling_params)
        self.start()
        text_of = {r.rid: t for r, t in zip(reqs, texts)}
        by_rid = {r.rid: r for r in reqs}
        group_of = {rid: g for g in groups for rid in g}
        left = {g[0]: len(g) for g in groups}
        show = self.progress if use_tqdm is None else use_tqdm
        from tqdm import tqdm

        bar = tqdm(total=len(groups), desc="requests", unit="req", disable=not show)
        done: dict[int, RequestOutput] = {}

        def finished(r: Request):
            g = group_of[r.rid]
            left[g[0]] -= 1
            if left[g[0]]:
                return  # its prompt's other samples are still running
            o = self._output([by_rid[i] for i in g], text_of[r.rid])
            done[g[0]] = o
            bar.update(1)
            if on_output:
                on_output(o)

        def progress(stats):
            d = stats.as_dict(log=False) if hasattr(stats, "as_dict") else stats
            post = {"tok/s": f"{d.get('tokens', 0) / max(time.perf_counter() - t0, 1e-9):.1f}"}
            if d.get("acceptance") is not None:
                post["accept"] = f"{d['acceptance']:.2f}"
            bar.set_postfix(post, refresh=False)

        t0 = time.perf_counter()
        try:
            if self.engine == "reference":
                from .scheduler.generator import Generator

                stats = Generator(self.backend, self.run_cfg, on_finish=finished, on_progress=progress).run(reqs)
                self.last_stats = stats.as_dict()
            else:
                self.last_stats = self._generate_ray(reqs, finished, progress)
        finally:
            bar.close()
        return [done[g[0]] for g in groups]

    def chat(self, messages, sampling_params=None, use_tqdm: bool | None = None, chat_template: str | None = None,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             chat_template_kwargs: dict | None = None, on_output=None) -> list[RequestOutput]:
        """vLLM's `LLM.chat`: one conversation (a list of {"role", "content"}) or a list of
        them, rendered through the tokenizer's chat template (or `chat_template`, a Jinja
        string); one RequestOutput per conversation, its `prompt` the rendered text."""
        from .chat import conversations, render

        prompts = [render(self.tokenizer, c, chat_template, add_generation_prompt, continue_final_message,
                          chat_template_kwargs) for c in conversations(messages)]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, on_output=on_output)

    def _generate_ray(self, reqs, finished, progress) -> dict:
        # An actor that dies mid-run is restarted with the rest of the set and the unfinished
        # requests re-run (actors/supervisor.py); any other actor error is one line, its
        # traceback in the run's log.
        from .actors.supervisor import supervised_generate

        return supervised_generate(self, reqs, finished, progress)

    def _run_ray(self, reqs, finished, progress) -> dict:
        import ray

        by_rid = {r.rid: r for r in reqs}
        payload = [{"rid": r.rid, "prompt_ids": r.prompt_ids, "params": r.params.to_dict(), "eos": r.eos_ids}
                   for r in reqs]
        if any(r.params.stop for r in reqs) and not self._coordinator_has_tokenizer:
            # Stop strings are matched where the tokens are: the coordinator detokenizes.
            ray.get(self.coordinator.set_tokenizer.remote(self.tokenizer))
            self._coordinator_has_tokenizer = True
        if self._abandoned is not None:  # an interrupted run (Ctrl-C) ends first
            try:
                ray.get(self._abandoned, timeout=60)
            except Exception:  # noqa: BLE001 - its error is not this run's
                pass
            self._abandoned = None
        ref = self.coordinator.generate.remote(payload)

        def drain():
            outs, stats = ray.get(self.coordinator.poll.remote())
            for o in outs:
                r = by_rid[o["rid"]]
                r.out, r.finish_reason, r.rounds = o["token_ids"], o["finish_reason"], o["passes"]
                r.stop_reason, r.text, r.logprobs = o["stop_reason"], o["text"], o["logprobs"]
                finished(r)
            if stats:
                progress(stats)

        try:
            while True:
                ready, _ = ray.wait([ref], timeout=0.2)
                drain()
                if ready:
                    stats = ray.get(ref)
                    drain()
                    stats["gpu_memory"] = ray.get(self.coordinator.memory.remote())  # {} on a CPU executor
                    return stats
        except BaseException:
            # Interrupted (Ctrl-C, SIGTERM): the run stops at its next pass boundary, and the
            # next run or shutdown collects its end (else Ray prints it as an unhandled error).
            # A run that already ended (its error raised here) is not asked to stop: that call
            # would race the next run's start on the coordinator's other thread.
            if not ray.wait([ref], timeout=0)[0]:
                self._abandoned = ref
                self.coordinator.stop.remote()
            raise

    def trace(self) -> dict:
        """Chrome-trace JSON (load it in chrome://tracing or Perfetto) of the stage spans since
        the last call: weight copies, CPU attention, GPU target compute and draft, per layer and
        batch. Needs `LLM(..., trace=True)`."""
        import ray

        if not self.plan.trace:
            raise ConfigError("start the engine with trace=True to record a timeline")
        return ray.get(self.coordinator.trace.remote())

    # -- lifecycle -------------------------------------------------------------------------
    def shutdown(self):
        if getattr(self, "engine", None) == "ray" and getattr(self, "coordinator", None) is not None:
            import ray

            if not ray.is_initialized():
                return
            abandoned, self._abandoned = getattr(self, "_abandoned", None), None
            if abandoned is not None:  # interrupted mid-run: it is stopping at a pass boundary
                ray.wait([abandoned], timeout=20)
            try:
                ray.get(self.coordinator.shutdown.remote())
            except ray.exceptions.RayActorError:
                # An actor died (the loader, which does nothing after loading, can die unnoticed
                # by the run): kill the rest and remove the run's /dev/shm folder from here.
                from .actors.supervisor import teardown

                teardown(self.run_id)
            finally:
                ray.kill(self.coordinator)
                self.coordinator = None
                if abandoned is not None:
                    try:
                        ray.get(abandoned, timeout=10)
                    except Exception:  # noqa: BLE001 - a run killed mid-pass: its error is expected
                        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
