"""specoffload: offloaded, speculative batch inference of LLMs on small GPUs, on Ray."""

if __package__:
    from .configs.engine_args import EngineArgs
    from .configs.run_config import RunConfig
    from .configs.sampling_params import SamplingParams
    from .errors import CapacityError, CheckpointError, ConfigError, SpecOffloadError
    from .placement.plan import Plan
# else: this file was imported as a plain module, not as the package. pytest does that to the
# repository root of a checkout whose folder name is not an identifier (the root is the package
# through pyproject's package-dir); the package itself is imported as `specoffload`.

__all__ = ["LLM", "SamplingParams", "EngineArgs", "Plan", "RunConfig", "SpecOffloadError", "CheckpointError",
           "ConfigError", "CapacityError"]
__version__ = "0.1.0"


def __getattr__(name):
    # LLM pulls in transformers and Ray; import it only when asked for.
    if name == "LLM":
        from .llm import LLM

        return LLM
    raise AttributeError(name)
