"""specoffload: offloaded, speculative batch inference of LLMs on small GPUs, on Ray."""

from .configs.run_config import RunConfig
from .configs.sampling_params import SamplingParams
from .errors import CapacityError, CheckpointError, ConfigError, SpecOffloadError
from .placement.plan import Plan

__all__ = ["LLM", "SamplingParams", "Plan", "RunConfig", "SpecOffloadError", "CheckpointError",
           "ConfigError", "CapacityError"]
__version__ = "0.1.0"


def __getattr__(name):
    # LLM pulls in transformers and Ray; import it only when asked for.
    if name == "LLM":
        from .llm import LLM

        return LLM
    raise AttributeError(name)
