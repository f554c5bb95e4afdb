"""`--model org/name`: a Hugging Face Hub id resolved to a local snapshot folder.

The snapshot comes from the local Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub, else
~/.cache/huggingface/hub), or is downloaded into it when the Hub is reachable and HF_HUB_OFFLINE
is not set; from then on it is read like any checkpoint folder (actors get the folder, not the
id). Paths that exist are taken as they are; what cannot be used gets a one-line error that says
what to do.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import CheckpointError

# What the engine reads from a snapshot: config, safetensors weights and their index, tokenizer.
ALLOW = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "merges.txt", "vocab.*"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def hub_cache_dir() -> str:
    """Read at call time (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return os.environ["HUGGINGFACE_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _gguf_error(p: Path) -> CheckpointError:
    return CheckpointError(
        f"{p} is a GGUF file; convert it to a safetensors folder first (transformers: "
        f"AutoModelForCausalLM.from_pretrained(DIR, gguf_file={p.name!r}) then .save_pretrained(OUT)) "
        f"and pass that folder")


def check_weights_format(folder: Path) -> None:
    """A folder with PyTorch .bin weights and no safetensors: say how to convert it."""
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file():
        return
    if any(folder.glob("*.bin")) or (folder / "pytorch_model.bin.index.json").is_file():
        raise CheckpointError(
            f"{folder} has only PyTorch .bin weights and specoffload reads safetensors; convert it with "
            f"AutoModelForCausalLM.from_pretrained({str(folder)!r}).save_pretrained(OUT, safe_serialization=True) "
            f"and pass OUT")
    ggufs = sorted(folder.glob("*.gguf"))
    if ggufs:
        raise _gguf_error(ggufs[0])


def resolve_model(name) -> Path:
    """A checkpoint folder for a local path or a Hub id (see the module doc)."""
    s = str(name)
    p = Path(s).expanduser()
    if p.exists():
        if p.is_file() and p.suffix == ".gguf":
            raise _gguf_error(p)
        if p.is_dir():
            check_weights_format(p)
        return p
    if p.suffix == ".gguf":
        raise CheckpointError(f"GGUF file not found: {p}")
    if not _HUB_ID.match(s):
        return p  # a missing folder: load_spec says so
    return Path(_snapshot(s))


def _snapshot(repo_id: str) -> str:
    from huggingface_hub import snapshot_download

    cache = hub_cache_dir()
    try:
        path = snapshot_download(repo_id, cache_dir=cache, local_files_only=True, allow_patterns=ALLOW)
    except Exception:  # not cached (LocalEntryNotFoundError and kin): download if allowed
        path = None
    if path is None:
        if _offline():
            raise CheckpointError(
                f"{repo_id} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set: "
                f"download it where the Hub is reachable (huggingface-cli download {repo_id}) or pass a local folder")
        try:
            path = snapshot_download(repo_id, cache_dir=cache, allow_patterns=ALLOW)
        except Exception as e:  # network, unknown repo, gated repo: one line with the cause
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointError(
                f"{repo_id} is neither a local folder nor in the Hugging Face cache ({cache}), and downloading "
                f"it failed ({type(e).__name__}: {why[:200]}); check the id and network (or set HF_TOKEN for a "
                f"gated model), or pass a local folder") from None
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{repo_id}: the cached snapshot {folder} has no config.json; "
                              f"download it again (huggingface-cli download {repo_id})")
    check_weights_format(folder)
    return folder
