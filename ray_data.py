"""Ray Data: batch inference over a dataset, one engine per Ray Data actor.

    import ray
    from specoffload.ray_data import SpecOffloadPredictor

    ds = ray.data.read_json("prompts.jsonl")            # a "prompt" column
    ds = ds.map_batches(SpecOffloadPredictor,
                        fn_constructor_kwargs={"model": "/models/llama", "draft": "self:8",
                                               "max_tokens": 128},
                        concurrency=2,                   # engine replicas
                        num_cpus=0, num_gpus=0,          # see below
                        batch_size=64)
    ds.write_json("out/")

Each replica's `LLM` starts its own engine actors (coordinator, I/O loader, executor,
CPU attention) in the same cluster; those actors request the resources (the executor one
GPU on CUDA or one CPU, the CPU attention worker `plan.attention_cpus`). The map actor
itself only drives them, so give it `num_cpus=0` (and `num_gpus=0`): resources it reserved
would be held idle, and on a small cluster the engine's actors could not be placed.

Output columns: the input batch plus "generated_text" (str), "num_tokens" (int) and
"token_ids" (list of int).
"""

from __future__ import annotations

import numpy as np


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
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        from .actors.io_loader import remove_local_run_dir

        run_id = getattr(llm, "run_id", None)
        try:
            llm.shutdown()
        finally:
            if run_id:
                remove_local_run_dir(run_id)

    def __del__(self):
        # Ray Data drops the UDF when its actor exits gracefully (in Ray 2.60 from the actor's
        # __ray_shutdown__). By then the engine's actors, which share the map actor's fate, can
        # already be going: coordinator.shutdown fails with ActorUnavailableError and the
        # loader never removes its files, so `shutdown` removes them itself.
        try:
            self.shutdown()
        except Exception:
            pass


