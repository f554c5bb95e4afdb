"""Ray Data: batch inference over a dataset, one engine per Ray Data actor.

    import ray
    from specoffload.ray_data import SpecOffloadPredictor

    ds = ray.data.read_json("prompts.jsonl")            # a "prompt" column
    ds = ds.map_batches(SpecOffloadPredictor,
                        fn_constructor_kwargs={"model": "/models/llama", "draft": "self:8",
                                               "max_tokens": 128},
                        concurrency=1,                   # engine replicas: at most one per GPU
                        num_cpus=0, num_gpus=0,          # see below
                        batch_size=64)
    ds.write_json("out/")

Each replica's `LLM` starts its own engine actors (coordinator, I/O loader, executor,
CPU attention) in the same cluster; those actors request the resources (the executor one
GPU on CUDA or one CPU, the CPU attention worker `plan.attention_cpus`). The map actor
itself only drives them, so give it `num_cpus=0` (and `num_gpus=0`): resources it reserved
would be held idle, and on a small cluster the engine's actors could not be placed.

Each replica's loader puts a whole copy of the weights in its node's /dev/shm: more replicas than
a node has GPUs, or than its /dev/shm holds copies, do not fit. `build_processor` (below, shaped
like ray.data.llm) checks both before it starts any.

Output columns: the input batch plus "generated_text" (str), "num_tokens" (int) and
"token_ids" (list of int).
"""

from __future__ import annotations

import numpy as np


def _stop_engine(owner):
    """Shut down `owner.llm` (once) and remove its run's shared-memory folder even if the
    shutdown fails: a map actor's engine may be half gone when Ray Data drops the UDF."""
    llm, owner.llm = getattr(owner, "llm", None), None
    if llm is None:
        return
    from .actors.io_loader import remove_local_run_dir

    run_id = getattr(llm, "run_id", None)
    try:
        llm.shutdown()
    finally:
        if run_id:
            remove_local_run_dir(run_id)


class SpecOffloadPredictor:
    def __init__(self, model=None, draft=None, max_tokens: int = 64, temperature: float = 0.0, *,
                 prompt_column: str = "prompt", sampling: dict | None = None,
                 apply_chat_template: bool = False, **llm_options):
        from .configs.sampling_params import SamplingParams
        from .llm import LLM

        self.params = SamplingParams(max_tokens=max_tokens, temperature=temperature, **(sampling or {}))
        self.prompt_column = prompt_column
        self.apply_chat_template = apply_chat_template
        llm_options.setdefault("progress", False)
        self.llm = LLM(model, draft=draft, **llm_options)

    def _inputs(self, prompts: list[str]) -> list:
        tok = self.llm.tokenizer
        if self.apply_chat_template and getattr(tok, "chat_template", None):
            texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                             add_generation_prompt=True) for p in prompts]
            return [{"prompt_token_ids": tok(t, add_special_tokens=False)["input_ids"]} for t in texts]
        return prompts

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from .errors import ConfigError

        if self.prompt_column not in batch:
            raise ConfigError(f"the batch has no {self.prompt_column!r} column (columns: {sorted(batch)})")
        prompts = [str(p) for p in batch[self.prompt_column]]
        if not prompts:
            out = dict(batch)
            out.update(generated_text=np.array([], dtype=object), num_tokens=np.array([], dtype=np.int64),
                       token_ids=np.array([], dtype=object))
            return out
        outs = self.llm.generate(self._inputs(prompts), self.params, use_tqdm=False)
        token_ids = np.empty(len(outs), dtype=object)
        token_ids[:] = [list(o.outputs[0].token_ids) for o in outs]
        out = dict(batch)
        out["generated_text"] = np.array([o.outputs[0].text for o in outs], dtype=object)
        out["num_tokens"] = np.array([len(o.outputs[0].token_ids) for o in outs], dtype=np.int64)
        out["token_ids"] = token_ids
        return out

    def shutdown(self):
        """Stop this replica's engine: its actors and the loader's shared-memory files."""
        _stop_engine(self)

    def __del__(self):
        # Ray Data drops the UDF when its actor exits gracefully (in Ray 2.60 from the actor's
        # __ray_shutdown__). By then the engine's actors, which share the map actor's fate, can
        # already be going: coordinator.shutdown fails with ActorUnavailableError and the
        # loader never removes its files, so `shutdown` removes them itself.
        try:
            self.shutdown()
        except Exception:
            pass




# -- a processor shaped like ray.data.llm's ---------------------------------------------------
from dataclasses import dataclass, field  # noqa: E402


@dataclass
class SpecOffloadProcessorConfig:
    """What `build_processor` builds, as ray.data.llm's vLLMEngineProcessorConfig says it:
    model (None: the embedded default), draft ("self:N" or a folder), plan (a file, dict or
    "auto"), batch_size (rows per engine call), concurrency (engine replicas: one per GPU on
    CUDA, and never more on a node than its free /dev/shm holds copies of the weights),
    engine_kwargs (other LLM options: k, schedule, engine, batch_size, ...), chat_template
    (for rows with `messages` when the tokenizer has none), runtime_env for the replicas."""

    model: str | None = None
    draft: str | None = None
    plan: object = None
    batch_size: int = 64
    concurrency: int = 1
    engine_kwargs: dict = field(default_factory=dict)
    chat_template: str | None = None
    runtime_env: dict | None = None


INT_PARAMS = ("max_tokens", "n", "top_k", "seed", "min_tokens", "logprobs")


def _row_params(sp) -> dict:
    """A row's sampling_params as Ray Data hands it (a dict whose missing keys Arrow filled
    with None, ints maybe as floats) -> SamplingParams keywords."""
    if sp is None:
        return {}
    if not isinstance(sp, dict):
        from .errors import ConfigError

        raise ConfigError(f"a row's sampling_params must be a dict, got {type(sp).__name__}")
    out = {}
    for k, v in sp.items():
        if v is None:
            continue
        if isinstance(v, np.ndarray):
            v = v.tolist()
        if k in INT_PARAMS:
            v = int(v)
        out[k] = v
    return out


def _messages(m) -> list[dict]:
    return [dict(x) for x in (m.tolist() if isinstance(m, np.ndarray) else m)]


def shm_free(path: str | None = None) -> int:
    """Free bytes in the shared-memory folder the loader writes weights to (this node's)."""
    import os

    from .actors.io_loader import default_shm_root

    st = os.statvfs(str(path or default_shm_root()))
    return st.f_bavail * st.f_frsize


def engine_slots(nodes: list[dict], need: int, cuda: bool) -> dict:
    """node id -> engines it can hold: one per GPU on CUDA, and as many copies of the weights
    (`need` bytes) as its free /dev/shm holds. nodes: [{"id", "gpus", "shm_free"}]."""
    slots = {}
    for n in nodes:
        k = n["shm_free"] // max(need, 1)
        if cuda:
            k = min(k, int(n["gpus"]))
        slots[n["id"]] = int(k)
    return slots


def _measure_nodes() -> list[dict]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    alive = [n for n in ray.nodes() if n.get("Alive")]
    probe = ray.remote(num_cpus=0)(shm_free)
    free = ray.get([probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
                    for n in alive])
    return [{"id": n["NodeID"], "gpus": n.get("Resources", {}).get("GPU", 0), "shm_free": f}
            for n, f in zip(alive, free)]


class _Reservation:
    """This node's /dev/shm bytes promised to engines still loading, so that two replicas
    starting together on one node do not both count the same free memory."""

    def __init__(self, need: int, root: str | None = None):
        import fcntl
        import os

        from .actors.io_loader import default_shm_root
        from .errors import CapacityError

        self.root = str(root or default_shm_root())
        os.makedirs(self.root, exist_ok=True)
        self.path = os.path.join(self.root, f"specoffload-reserve-{os.getpid()}-{id(self)}")
        with open(os.path.join(self.root, "specoffload-reserve.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            held = 0
            for name in os.listdir(self.root):
                if name.startswith("specoffload-reserve-"):
                    pid = int(name.split("-")[2])
                    try:
                        os.kill(pid, 0)
                        held += int(open(os.path.join(self.root, name)).read() or 0)
                    except (OSError, ValueError):  # its process is gone: the promise lapsed
                        try:
                            os.remove(os.path.join(self.root, name))
                        except OSError:
                            pass
            free = shm_free(self.root) - held
            if need > free:
                raise CapacityError(
                    f"this node's {self.root} has {free / 2**30:.2f} GiB free for another engine's weights and one "
                    f"needs {need / 2**30:.2f} GiB: lower concurrency (engines on one node each hold a copy)")
            with open(self.path, "w") as f:
                f.write(str(need))

    def release(self):
        import os

        try:
            os.remove(self.path)
        except OSError:
            pass


class _ProcessorUDF:
    """One engine replica: rows with `messages` or `prompt` and their own `sampling_params`."""

    def __init__(self, config: SpecOffloadProcessorConfig, need: int):
        from .llm import LLM

        kw = dict(config.engine_kwargs)
        kw.setdefault("progress", False)
        res = _Reservation(need) if kw.get("engine", "ray") == "ray" else None
        try:
            self.llm = LLM(config.model, draft=config.draft, plan=config.plan, **kw)
        finally:
            if res is not None:
                res.release()  # loaded: its files now count in /dev/shm's own figures
        self.chat_template = config.chat_template

    def __call__(self, batch: dict) -> dict:
        from .chat import render
        from .configs.sampling_params import SamplingParams
        from .errors import ConfigError

        n = len(next(iter(batch.values()))) if batch else 0
        inputs, params = [], []
        for i in range(n):
            m = batch["messages"][i] if "messages" in batch else None
            if m is not None and not (isinstance(m, float) and np.isnan(m)):
                inputs.append(render(self.llm.tokenizer, _messages(m), self.chat_template))
            elif "prompt" in batch and batch["prompt"][i] is not None:
                inputs.append(str(batch["prompt"][i]))
            else:
                raise ConfigError("each row needs a 'messages' or a 'prompt' column")
            params.append(SamplingParams(**_row_params(batch["sampling_params"][i] if "sampling_params" in batch
                                                       else None)))
        outs = self.llm.generate(inputs, params, use_tqdm=False) if n else []
        out = dict(batch)

        def col(values):
            a = np.empty(len(values), dtype=object)
            a[:] = values
            return a

        out["prompt"] = col([o.prompt for o in outs])
        out["generated_text"] = col([o.outputs[0].text for o in outs])
        out["generated_tokens"] = col([list(o.outputs[0].token_ids) for o in outs])
        out["num_generated_tokens"] = np.array([len(o.outputs[0].token_ids) for o in outs], dtype=np.int64)
        out["num_input_tokens"] = np.array([len(o.prompt_token_ids) for o in outs], dtype=np.int64)
        out["finish_reason"] = col([o.outputs[0].finish_reason for o in outs])
        return out

    def __del__(self):
        try:  # as SpecOffloadPredictor.__del__: the engine's actors may already be going
            _stop_engine(self)
        except Exception:
            pass


class Processor:
    """ds -> preprocess (Dataset.map) -> the engine replicas (map_batches) -> postprocess."""

    def __init__(self, config, preprocess=None, postprocess=None, preprocess_map_kwargs=None,
                 postprocess_map_kwargs=None):
        self.config, self.preprocess, self.postprocess = config, preprocess, postprocess
        self.pre_kw, self.post_kw = preprocess_map_kwargs or {}, postprocess_map_kwargs or {}
        self.need = self._check_capacity()

    def _check_capacity(self) -> int:
        """Bytes of /dev/shm one engine's weights take; refuses a concurrency the cluster's
        nodes cannot hold (GPUs, free /dev/shm) with one line."""
        from .errors import ConfigError
        from .llm import LLM
        from .models.spec import load_spec
        from .placement.cost_model import model_bytes
        from .ray_env import ensure_ray

        c = self.config
        if not isinstance(c.concurrency, int) or c.concurrency < 1:
            raise ConfigError(f"concurrency must be a positive integer, got {c.concurrency!r}")
        model = c.model
        if model is None:
            from .sources.default_model import default_model_dir

            model = default_model_dir()
        spec = load_spec(model, dtype=c.engine_kwargs.get("dtype"))
        if c.engine_kwargs.get("quantize"):  # each replica's /dev/shm holds the fp8 bytes
            from dataclasses import replace

            spec = replace(spec, weights="fp8")
        need = model_bytes(spec)
        if c.engine_kwargs.get("engine", "ray") != "ray":
            return need
        ensure_ray(c.engine_kwargs.get("ray_address"))
        cuda = _plan_device(c, LLM) == "cuda"
        nodes = _measure_nodes()
        slots = engine_slots(nodes, need, cuda)
        if sum(slots.values()) < c.concurrency:
            per = ", ".join(f"{n['id'][:8]}: {slots[n['id']]} ({int(n['gpus'])} GPU, "
                            f"{n['shm_free'] / 2**30:.1f} GiB free shm)" for n in nodes)
            raise ConfigError(f"concurrency {c.concurrency}: the cluster holds {sum(slots.values())} engines of "
                              f"{need / 2**30:.2f} GiB weights (per node: {per}); lower concurrency")
        return need

    def __call__(self, ds):
        c = self.config
        if self.preprocess is not None:
            ds = ds.map(self.preprocess, **self.pre_kw)
        # The replica only drives its engine, whose actors take the CPUs and the GPU.
        kw = {"runtime_env": c.runtime_env} if c.runtime_env else {}
        ds = ds.map_batches(_ProcessorUDF, fn_constructor_kwargs={"config": c, "need": self.need},
                            concurrency=c.concurrency, num_cpus=0, num_gpus=0, batch_size=c.batch_size,
                            batch_format="numpy", **kw)
        if self.postprocess is not None:
            ds = ds.map(self.postprocess, **self.post_kw)
        return ds


def _plan_device(c, LLM) -> str:
    """"cuda" or "cpu": where the replicas' executors will run."""
    import torch

    dev = c.engine_kwargs.get("device", "auto")
    if isinstance(c.plan, (str, dict)) and c.plan != "auto":
        from .placement.plan import Plan

        p = Plan.from_dict(c.plan) if isinstance(c.plan, dict) else Plan.from_file(c.plan)
        return p.device
    if dev == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return dev


def build_processor(config: SpecOffloadProcessorConfig, preprocess=None, postprocess=None,
                    preprocess_map_kwargs=None, postprocess_map_kwargs=None) -> Processor:
    """ray.data.llm.build_processor's shape: `processor(ds)` returns the generated dataset.

        config = SpecOffloadProcessorConfig(model="/models/llama", draft="self:8", batch_size=64, concurrency=1)
        processor = build_processor(config,
            preprocess=lambda row: dict(messages=[{"role": "user", "content": row["q"]}],
                                        sampling_params=dict(temperature=0, max_tokens=64)),
            postprocess=lambda row: dict(answer=row["generated_text"], **row))
        ds = processor(ray.data.read_json("questions.jsonl"))
    """
    return Processor(config, preprocess, postprocess, preprocess_map_kwargs, postprocess_map_kwargs)
