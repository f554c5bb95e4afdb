"""Convert a GGUF file (llama.cpp format) into a Hugging Face checkpoint folder.

The folder holds ``config.json``, ``generation_config.json``, the tokenizer files and one
``model.safetensors`` with the standard Hugging Face tensor names, so that
``transformers.AutoModelForCausalLM.from_pretrained(folder)`` loads it like any other
checkpoint, without going through transformers' (slow, per-load) GGUF path again.

Tensors are dequantized with the PyPI ``gguf`` package (``gguf.GGUFReader`` +
``gguf.quants.dequantize``) one at a time and streamed into the safetensors file, so the
peak memory is about one tensor, not the whole model.  llama.cpp's converter permutes the
rows of llama's Q and K projections (to interleave the rotary halves); this module undoes
that permutation for the ``llama`` architecture (qwen2/qwen3 files are not permuted).

The folder is written atomically: everything goes into a temporary folder next to
``out_dir`` that is renamed into place only when complete, and the last file written is
a marker (:data:`MARKER_NAME`) describing the conversion, which caches check for.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CONVERTER_VERSION",
    "GGUF_MAGIC",
    "MARKER_NAME",
    "SUPPORTED_ARCHITECTURES",
    "check_gguf_file",
    "convert_gguf",
    "read_marker",
    "is_converted",
]

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
MARKER_NAME = "specoffload_conversion.json"
# Bump when the produced folder changes in a way that should invalidate caches.
CONVERTER_VERSION = 1

# GGUF architecture -> whether llama.cpp permuted the Q/K projection rows.
SUPPORTED_ARCHITECTURES: dict[str, bool] = {"llama": True, "qwen2": False, "qwen3": False}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
# Tensors that carry nothing a Hugging Face checkpoint stores (derived from the config).
_SKIPPED = {"rope_freqs.weight"}

_SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
}


def check_gguf_file(gguf_path: str | os.PathLike) -> Path:
    """Return ``gguf_path`` as a Path after checking it exists and starts with the GGUF magic.

    Raises ``FileNotFoundError`` (missing) or ``ValueError`` (not a GGUF file), both naming
    the file.
    """
    path = Path(gguf_path)
    if not path.exists():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    if not path.is_file():
        raise ValueError(f"not a GGUF file (not a regular file): {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(
            f"not a GGUF file: {path} (starts with {magic!r}, expected {GGUF_MAGIC!r})"
        )
    return path


def hf_tensor_name(gguf_name: str) -> str | None:
    """Map a llama.cpp tensor name to the Hugging Face one (``None``: not stored in HF)."""
    if gguf_name in _SKIPPED:
        return None
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    raise ValueError(f"unknown GGUF tensor {gguf_name!r}: no Hugging Face name for it")


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's ``permute`` of a Q or K projection weight (or bias).

    llama.cpp (convert_hf_to_gguf.py, ``LlamaModel.permute``) does
    ``w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)``;
    this is its inverse.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot un-permute {tuple(w.shape)} with {n_head} heads")
    rest = tuple(w.shape[1:])
    return w.reshape(n_head, rows // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _hf_shape(tensor) -> list[int]:
    # GGUF stores dimensions fastest-varying first (ne0, ne1, ...); torch is the reverse.
    return [int(d) for d in reversed(list(tensor.shape))]


def _dequantize(tensor) -> np.ndarray:
    from gguf.quants import dequantize

    arr = dequantize(tensor.data, tensor.tensor_type)
    if not arr.flags.writeable:  # a view into the read-only memory map (F32 tensors)
        arr = arr.copy()
    return arr.reshape(_hf_shape(tensor))


def _causal_lm_class_name(model_type: str) -> str | None:
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    except Exception:  # pragma: no cover - transformers layout changed
        return None


def _set_config_dtype(config, dtype: torch.dtype) -> None:
    # transformers >= 4.56 calls it ``dtype``; older versions ``torch_dtype``.
    try:
        config.dtype = dtype
    except Exception:  # pragma: no cover
        config.torch_dtype = dtype


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def read_marker(folder: str | os.PathLike) -> dict | None:
    """The conversion marker of ``folder`` (a dict), or ``None`` if there is none."""
    try:
        with open(Path(folder) / MARKER_NAME, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_converted(
    folder: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    source_sha256: str | None = None,
    source_size: int | None = None,
) -> bool:
    """Whether ``folder`` holds a finished conversion by this converter version.

    Optionally also checks the dtype and the source file's sha256 / size recorded in the
    marker.
    """
    marker = read_marker(folder)
    if not marker or marker.get("converter_version") != CONVERTER_VERSION:
        return False
    if dtype is not None and marker.get("dtype") != str(dtype).removeprefix("torch."):
        return False
    if source_sha256 is not None and marker.get("source_sha256") != source_sha256:
        return False
    if source_size is not None and marker.get("source_size") != source_size:
        return False
    return (Path(folder) / "model.safetensors").is_file()


def _write_safetensors_streaming(path: Path, entries, dtype, progress: bool, desc: str):
    """Write ``entries`` [(tensor, hf_name, n_unpermute_heads or None)] to a safetensors file.

    The header is computed up front from the GGUF shapes, then each tensor is dequantized,
    fixed up, cast and appended, so only one tensor is in memory at a time.
    """
    from tqdm.auto import tqdm

    st_dtype = _SAFETENSORS_DTYPES[dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor, name, _ in entries:
        shape = _hf_shape(tensor)
        nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize
        header[name] = {"dtype": st_dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)

    with open(path, "wb") as f:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for tensor, name, n_heads in tqdm(entries, desc=desc, unit="tensor", disable=not progress):
            w = torch.from_numpy(_dequantize(tensor))
            if n_heads is not None:
                w = unpermute_qk(w, n_heads)
            w = w.to(dtype).contiguous()
            expected = header[name]
            if list(w.shape) != expected["shape"]:  # pragma: no cover - defensive
                raise RuntimeError(f"{name}: shape {list(w.shape)} != {expected['shape']}")
            f.write(w.view(torch.uint8).numpy().tobytes() if w.numel() else b"")
        if f.tell() != 8 + len(header_bytes) + offset:  # pragma: no cover - defensive
            raise RuntimeError(f"{path}: wrote {f.tell()} bytes, expected {8 + len(header_bytes) + offset}")
        f.flush()
        os.fsync(f.fileno())


def convert_gguf(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    overwrite: bool = False,
    source_sha256: str | None = None,
) -> Path:
    """Convert ``gguf_path`` into a Hugging Face checkpoint folder ``out_dir``; return it.

    ``dtype`` is the dtype of the stored weights (float32, bfloat16 or float16).
    ``progress`` shows a tqdm bar over the tensors.  An existing non-empty ``out_dir`` is
    an error (``FileExistsError``) unless ``overwrite``; it is then replaced only once the
    new folder is complete.  ``source_sha256``, if the caller knows it, is recorded in the
    marker file.

    Raises ``FileNotFoundError`` if the file is missing, ``ValueError`` if it is not a GGUF
    file or holds an unsupported architecture / tensor.
    """
    gguf_path = check_gguf_file(gguf_path).resolve()
    out_dir = Path(out_dir).expanduser().absolute()
    if dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"dtype must be one of {list(_SAFETENSORS_DTYPES)}, not {dtype}")
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"output folder exists and is not empty: {out_dir} (pass overwrite=True)")

    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(gguf_path))
    except Exception as e:
        raise ValueError(f"cannot read GGUF file {gguf_path}: {e}") from e
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{gguf_path}: unsupported GGUF architecture {arch!r} "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    n_head = _field(reader, f"{arch}.attention.head_count")
    n_head_kv = _field(reader, f"{arch}.attention.head_count_kv", n_head)
    permuted = SUPPORTED_ARCHITECTURES[arch]

    entries = []
    seen = set()
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        if name is None:
            logger.warning("%s: skipping GGUF tensor %s", gguf_path.name, tensor.name)
            continue
        if name in seen:
            raise ValueError(f"{gguf_path}: duplicate tensor {tensor.name}")
        seen.add(name)
        heads = None
        if permuted and ".self_attn.q_proj." in name:
            heads = n_head
        elif permuted and ".self_attn.k_proj." in name:
            heads = n_head_kv
        entries.append((tensor, name, heads))
    if "model.embed_tokens.weight" not in seen:
        raise ValueError(f"{gguf_path}: no token_embd.weight tensor")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        src_dir, src_name = str(gguf_path.parent), gguf_path.name
        config = AutoConfig.from_pretrained(src_dir, gguf_file=src_name)
        config.tie_word_embeddings = "lm_head.weight" not in seen
        cls_name = _causal_lm_class_name(config.model_type)
        if cls_name:
            config.architectures = [cls_name]
        _set_config_dtype(config, dtype)
        config.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)

        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=src_name)
        tokenizer.save_pretrained(tmp)

        _write_safetensors_streaming(
            tmp / "model.safetensors", entries, dtype, progress, f"converting {gguf_path.name}"
        )
        del entries, reader  # drop the memory map before the caller possibly deletes the file

        marker = {
            "converter_version": CONVERTER_VERSION,
            "source": gguf_path.name,
            "source_size": gguf_path.stat().st_size,
            "source_sha256": source_sha256,
            "architecture": arch,
            "model_type": config.model_type,
            "dtype": str(dtype).removeprefix("torch."),
            "tensors": len(seen),
        }
        _write_json(tmp / MARKER_NAME, marker)  # written last: marks the folder complete
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700

        _move_into_place(tmp, out_dir, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _move_into_place(tmp: Path, out_dir: Path, *, overwrite: bool) -> None:
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if not out_dir.exists() and not out_dir.is_symlink():
        os.rename(tmp, out_dir)
        return
    if not overwrite:
        raise FileExistsError(f"output folder appeared during conversion: {out_dir}")
    trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    old = trash / "old"
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)
