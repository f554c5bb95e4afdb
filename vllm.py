"""vLLM's offline API names with vLLM's defaults, for scripts written for vLLM:

    from specoffload.vllm import LLM, SamplingParams     # was: from vllm import LLM, SamplingParams

`SamplingParams` here defaults to temperature 1.0 and max_tokens 16 as vLLM's does;
`specoffload.SamplingParams` keeps greedy and 64 tokens, which the CLI and the engine's own
scripts and tests rely on. Everything else is the same class.
"""

from __future__ import annotations

from dataclasses import dataclass

from .configs.sampling_params import SamplingParams as _SamplingParams
from .configs.sampling_params import accept_vllm_names
from .outputs import CompletionOutput, Logprob, RequestOutput

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]


@accept_vllm_names
@dataclass(frozen=True)
class SamplingParams(_SamplingParams):
    max_tokens: int = 16
    temperature: float = 1.0




# vLLM engine arguments that change nothing here (speculation, offloading and batching are
# this engine's own options); anything else is a one-line error naming it.
IGNORED_ENGINE_ARGS = {"trust_remote_code", "enforce_eager", "gpu_memory_utilization", "max_model_len", "seed",
                       "disable_log_stats", "swap_space", "enable_prefix_caching", "enable_chunked_prefill",
                       "max_num_batched_tokens", "tokenizer_mode", "download_dir", "load_format"}


def _vllm_llm():
    from .errors import ConfigError
    from .llm import LLM as _LLM

    class LLM(_LLM):
        """specoffload's LLM taking vLLM's constructor arguments too: `max_num_seqs` sets the
        batch size, `dtype="auto"` is the checkpoint's, parallel sizes other than 1 are refused."""

        def __init__(self, model=None, draft=None, *, tokenizer=None, dtype="auto", tensor_parallel_size: int = 1,
                     pipeline_parallel_size: int = 1, max_num_seqs: int | None = None, quantization=None, **kw):
            for name, v in (("tensor_parallel_size", tensor_parallel_size),
                            ("pipeline_parallel_size", pipeline_parallel_size)):
                if v != 1:
                    raise ConfigError(f"LLM: {name}={v} is not supported (one executor per engine)")
            if tokenizer is not None and str(tokenizer) != str(model):
                raise ConfigError("LLM: a tokenizer other than the model's is not supported")
            for name in [n for n in kw if n in IGNORED_ENGINE_ARGS]:
                kw.pop(name)
            if max_num_seqs is not None:
                kw.setdefault("batch_size", max_num_seqs)
            # vLLM's quantization="fp8" quantizes a bf16 checkpoint at load (an fp8 one stays as
            # it is); naming the checkpoint's own fp8 format changes nothing.
            if quantization == "fp8":
                kw.setdefault("quantize", "fp8")
            elif quantization not in (None, "compressed-tensors"):
                raise ConfigError(f"LLM: quantization={quantization!r} is not supported (fp8, or an fp8 checkpoint's "
                                  f"own format)")
            try:
                super().__init__(model, draft, dtype=None if dtype == "auto" else dtype, **kw)
            except TypeError as e:  # an engine argument of vLLM's we do not have
                raise ConfigError(f"LLM: {e}".replace("__init__() ", "")) from None

        # Without sampling params, vLLM's defaults (temperature 1.0, 16 tokens), not the engine's.
        def generate(self, prompts, sampling_params=None, *args, **kw):
            if sampling_params is None and kw.get("params") is None:
                sampling_params = SamplingParams()
            return super().generate(prompts, sampling_params, *args, **kw)

        def chat(self, messages, sampling_params=None, *args, **kw):
            return super().chat(messages, SamplingParams() if sampling_params is None else sampling_params,
                                *args, **kw)

    return LLM


def __getattr__(name):
    if name == "LLM":  # pulls in transformers and Ray: only when asked for
        global LLM
        LLM = _vllm_llm()
        return LLM
    raise AttributeError(name)
