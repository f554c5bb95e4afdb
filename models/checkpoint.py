"""Tensor-by-tensor reading of a local Hugging Face checkpoint folder.

`Checkpoint(dir).read_layer(j)` opens only the shards that hold layer j, through
`safetensors.safe_open`, so a loader can stream one layer without touching the rest.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CheckpointError
from .fp8_checkpoint import SCALE_SUFFIXES, SKIPPED_SUFFIXES, Fp8Format, check_finite_fp8
from .fp8_weights import FP8, INPUT_SCALE, SCALE, gathered
from .layers import layer_shapes
from .spec import ModelSpec, load_spec
from .weight_checks import check_global_shapes, check_layer_shapes, check_tensor

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_DIRECT = {
    "input_layernorm.weight": "ln1",
    "post_attention_layernorm.weight": "ln2",
    "self_attn.q_proj.weight": "q",
    "self_attn.k_proj.weight": "k",
    "self_attn.v_proj.weight": "v",
    "self_attn.o_proj.weight": "o",
    "self_attn.q_proj.bias": "q_bias",
    "self_attn.k_proj.bias": "k_bias",
    "self_attn.v_proj.bias": "v_bias",
    "self_attn.q_norm.weight": "q_norm",
    "self_attn.k_norm.weight": "k_norm",
    "mlp.gate_proj.weight": "gate",
    "mlp.up_proj.weight": "up",
    "mlp.down_proj.weight": "down",
    "block_sparse_moe.gate.weight": "router",
    "mlp.gate.weight": "router",
    "mlp.shared_expert.gate_proj.weight": "s_gate",  # Qwen2-MoE's shared expert and its gate
    "mlp.shared_expert.up_proj.weight": "s_up",
    "mlp.shared_expert.down_proj.weight": "s_down",
    "mlp.shared_expert_gate.weight": "shared_gate",
}
# Mixtral's experts (w1/w3/w2), and the Qwen MoE ones (gate_proj/up_proj/down_proj).
_EXPERT = re.compile(r"^(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_EXPERT_KEY = {"w1": "w_gate", "w3": "w_up", "w2": "w_down",
               "gate_proj": "w_gate", "up_proj": "w_up", "down_proj": "w_down"}


def _our_key(short: str) -> tuple[str, int | None] | None:
    """A layer tensor's HF name (past `model.layers.N.`) -> (our key, expert index or None), or
    None for a name outside the plain and per-expert layouts."""
    if short in _DIRECT:
        return _DIRECT[short], None
    m = _EXPERT.match(short)
    return (_EXPERT_KEY[m.group(2)], int(m.group(1))) if m else None


class Checkpoint:
    """Index of a checkpoint folder: which file holds which tensor, read lazily."""

    def __init__(self, model_dir, dtype: str | None = None):
        self.dir = Path(model_dir)
        self.spec: ModelSpec = load_spec(self.dir, dtype=dtype)
        self.dtype = self.spec.torch_dtype
        # an fp8 checkpoint's format (models/fp8_checkpoint.py); load_spec checked the config
        cfg = json.loads((self.dir / "config.json").read_text())
        self.fp8 = Fp8Format.of(self.dir / "config.json", cfg.get("quantization_config"))
        self._header_dtypes: dict[str, str] = {}
        self._extents: dict[str, tuple[int, int]] = {}  # name -> (byte offset in its file, nbytes)
        self._where = self._index()
        self._check_fp8_scales()
        self._layers: dict[int, dict[str, str]] = {}
        for name in self._where:
            m = _LAYER.match(name)
            if m:
                self._layers.setdefault(int(m.group(1)), {})[m.group(2)] = name
        missing = [j for j in range(self.spec.num_layers) if j not in self._layers]
        if missing:
            raise CheckpointError(f"{self.dir}: no tensors for layer(s) {missing[:5]}")
        if "model.embed_tokens.weight" not in self._where:
            raise CheckpointError(f"{self.dir}: no model.embed_tokens.weight in any shard")

    def _index(self) -> dict[str, Path]:
        idx = self.dir / "model.safetensors.index.json"
        where: dict[str, Path] = {}
        if idx.is_file():
            try:
                weight_map = json.loads(idx.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{idx}: not a valid safetensors index ({e})") from None
            for name, fname in weight_map.items():
                where[name] = self.dir / fname
            for f in sorted(set(where.values())):
                if not f.is_file():
                    raise CheckpointError(f"missing shard {f} (listed in {idx.name})")
                self._header_dtypes.update(self._check_header(f, self._extents))
            return where
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            from ..sources.hub import check_weights_format

            check_weights_format(self.dir)  # .bin or .gguf only: says how to convert
            raise CheckpointError(f"no *.safetensors files in {self.dir}")
        for f in files:
            header = self._check_header(f, self._extents)
            self._header_dtypes.update(header)
            for name in header:
                where[name] = f
        return where

    @staticmethod
    def _check_header(f: Path, extents: dict | None = None) -> dict[str, str]:
        """Open the header and check every tensor's bytes are inside the file (truncation);
        `extents` gets each tensor's (byte offset in the file, nbytes)."""
        try:
            size = f.stat().st_size
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if n <= 0 or 8 + n > size:
                    raise ValueError("header length beyond end of file")
                header = json.loads(fh.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if 8 + n + end > size:
                raise ValueError(f"truncated: {size} bytes, tensors need {8 + n + end}")
            if extents is not None:
                for k, v in header.items():
                    if k != "__metadata__":
                        a, b = v["data_offsets"]
                        extents[k] = (8 + n + a, b - a)
            return {k: v.get("dtype", "") for k, v in header.items() if k != "__metadata__"}
        except (ValueError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self._where[n], []).append(n)
        out = {}
        for f, ns in by_file.items():
            try:
                with safe_open(str(f), framework="pt") as fh:
                    for n in ns:
                        raw = fh.get_tensor(n)
                        if raw.dtype == FP8:  # stays fp8 (its scale checked at init): half the bytes
                            out[n] = raw
                            check_finite_fp8(f, n, raw)
                            continue
                        # fp8 scales stay fp32 (a bf16 scale widens exactly)
                        out[n] = raw.float() if n.endswith(tuple(SCALE_SUFFIXES)) else raw.to(self.dtype)
                        check_tensor(f, n, raw, out[n])  # float, finite (models/weight_checks.py)
            except CheckpointError:
                raise
            except Exception as e:
                raise CheckpointError(f"{f}: {str(e).splitlines()[0]}") from None
        return out

    def read_layer(self, j: int) -> dict[str, torch.Tensor]:
        """Layer j in our flat layout (see layers.LAYER_KEYS), experts stacked."""
        names = {s: f for s, f in self._layers[j].items() if not s.endswith(SKIPPED_SUFFIXES)}
        raw = self._read(list(names.values()))
        w: dict[str, torch.Tensor] = {}
        experts: dict[str, dict[int, torch.Tensor]] = {}
        for short, full in names.items():
            t, suffix = raw[full], ""
            for ck, ours in SCALE_SUFFIXES.items():  # an fp8 scale: filed under its weight's name
                if short.endswith(ck):
                    short, suffix = short[: -len(ck)] + ".weight", ours
            key = _our_key(short)
            if key is not None and key[1] is None:
                w[key[0] + suffix] = t
            elif key is not None:
                experts.setdefault(key[0] + suffix, {})[key[1]] = t
            elif suffix:
                raise CheckpointError(f"{self._where[full]}: unexpected tensor {full}")
            elif short == "mlp.experts.gate_up_proj":  # transformers 5 fused layout
                w["w_gate"], w["w_up"] = (x.contiguous() for x in t.chunk(2, dim=1))
            elif short == "mlp.experts.down_proj":
                w["w_down"] = t
            elif short.endswith("rotary_emb.inv_freq"):
                continue
            else:
                raise CheckpointError(f"{self._where[full]}: unexpected tensor {full}")
        for key, parts in experts.items():
            if sorted(parts) != list(range(self.spec.num_experts)):
                raise CheckpointError(f"{self.dir}: layer {j} is missing experts for {key}")
            w[key] = torch.stack([parts[e] for e in range(self.spec.num_experts)])
        if self.fp8 is not None:
            w = self._fp8_scales(j, w)
        need = set(layer_shapes(self.spec, j))
        if need - set(w):
            raise CheckpointError(f"{self.dir}: layer {j} lacks {sorted(need - set(w))}")
        check_layer_shapes(self.dir, self.spec, j, w)
        return w

    def layer_extents(self, j: int) -> dict[str, list[tuple[Path, int, int]]] | None:
        """Layer j as byte ranges of its files, in read_layer's layout (an expert matrix: its
        experts' ranges in order, as stacked), for a reader that copies them straight into a
        buffer (the disk tier, after read_layer has checked the layer once). None where the
        bytes on disk are not the layout's: stored in another dtype than the run's, fp8 with
        scales, or transformers 5's fused expert tensors."""
        if self.fp8 is not None:
            return None
        stored = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}.get(self.dtype)
        out: dict[str, list] = {}
        experts: dict[str, dict[int, tuple]] = {}
        for short, full in self._layers[j].items():
            if short.endswith(SKIPPED_SUFFIXES) or short.endswith("rotary_emb.inv_freq"):
                continue
            if self._header_dtypes.get(full) != stored or full not in self._extents:
                return None
            key, ext = _our_key(short), (self._where[full], *self._extents[full])
            if key is None:
                return None
            if key[1] is None:
                out[key[0]] = [ext]
            else:
                experts.setdefault(key[0], {})[key[1]] = ext
        for key, parts in experts.items():
            if sorted(parts) != list(range(self.spec.num_experts)):
                return None
            out[key] = [parts[e] for e in range(self.spec.num_experts)]
        return out

    def _check_fp8_scales(self):
        """From the headers alone, before any actor starts: every fp8 weight has its scale."""
        for name, dt in self._header_dtypes.items():
            if dt != "F8_E4M3":
                continue
            if self.fp8 is None:
                raise CheckpointError(f"{self._where[name]}: tensor {name} is fp8 but config.json has no "
                                      f"quantization_config saying how it is scaled")
            if self._scale_of(name) is None:
                raise CheckpointError(f"{self._where[name]}: tensor {name} is fp8 but has no scale "
                                      f"(weight_scale / weight_scale_inv)")

    def _scale_of(self, name: str) -> str | None:
        """The checkpoint's name of fp8 tensor `name`'s weight scale, if it has one."""
        base = name[: -len(".weight")] if name.endswith(".weight") else name
        return next((base + sfx for sfx in (".weight_scale", ".weight_scale_inv") if base + sfx in self._where), None)

    def _fp8_scales(self, j: int, w: dict) -> dict:
        """Each fp8 matrix has its scale, in our layout (models/fp8_checkpoint.py)."""
        for k, t in list(w.items()):
            if t.dtype == FP8:
                if k + SCALE not in w:
                    raise CheckpointError(f"{self.dir}: layer {j} tensor {k} is fp8 but has no scale "
                                          f"(weight_scale / weight_scale_inv)")
                w[k + SCALE] = self.fp8.scale(self.dir, f"layer {j} {k}", t, w[k + SCALE])
            elif k.endswith(SCALE) and k[: -len(SCALE)] in w and w[k[: -len(SCALE)]].dtype != FP8:
                del w[k]  # a scale beside a weight stored unquantized: nothing to scale
        for k in [k for k in w if k.endswith(INPUT_SCALE)]:
            w[k] = w[k].reshape(-1).contiguous()  # [1], experts [E]
        return w

    def read_globals(self) -> dict[str, torch.Tensor]:
        """Embeddings, final norm and LM head (tied head shares the embedding tensor)."""
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        tied = self.spec.tie_embeddings or "lm_head.weight" not in self._where
        if not tied:
            names.append("lm_head.weight")
        missing = [n for n in names if n not in self._where]
        if missing:
            raise CheckpointError(f"{self.dir}: missing {missing}")
        # a format that quantized the head too: widened here (the head runs resident, in dtype);
        # every fp8 tensor's scale was found at init (_check_fp8_scales)
        scales = {n: sc for n in names if (sc := self._scale_of(n))}
        raw = self._read(names + list(scales.values()))
        for n in [n for n in names if raw[n].dtype == FP8]:
            s = self.fp8.scale(self.dir, n, raw[n], raw[scales[n]])
            raw[n] = gathered({"w": raw[n], "w" + SCALE: s})["w"].dequantize(self.dtype)
        embed = raw["model.embed_tokens.weight"]
        g = {
            "embed": embed,
            "norm": raw["model.norm.weight"],
            "head": embed if tied else raw["lm_head.weight"],
        }
        check_global_shapes(self.dir, self.spec, g)
        return g
