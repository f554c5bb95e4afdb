"""`--model org/name`: Hub ids from a (fake) local Hugging Face cache, offline; one-line errors
for an id neither cached nor reachable, a .bin-only folder and a .gguf file."""

from __future__ import annotations

import shutil

import pytest

from hf_reference import PROMPTS, hf_greedy
from specoffload.cli import main
from specoffload.configs.sampling_params import SamplingParams
from specoffload.errors import CheckpointError
from specoffload.llm import LLM
from specoffload.models.hub import resolve_model


def _fake_cache(root, repo_id: str, src, commit: str = "0123abcd") -> object:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    shutil.copytree(src, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snap


@pytest.fixture
def hub(tmp_path, monkeypatch, tiny_dir):
    root = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return {"target": _fake_cache(root, "tiny-org/tiny-llama", tiny_dir("llama")),
            "draft": _fake_cache(root, "tiny-org/tiny-llama-draft", tiny_dir("llama", seed=1, num_hidden_layers=1),
                                 "feedbeef")}


def test_ids_resolve_to_cached_snapshots_and_generate(hub):
    assert resolve_model("tiny-org/tiny-llama") == hub["target"]
    want = hf_greedy(hub["target"], PROMPTS, 12)
    with LLM("tiny-org/tiny-llama", draft="tiny-org/tiny-llama-draft", engine="reference", k=3,
             batch_size=4, progress=False) as llm:
        assert llm.model_dir == hub["target"] and llm.draft_desc[1] == str(hub["draft"])
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(max_tokens=12, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == want


def test_cli_takes_an_id(hub, capsys):
    assert main(["generate", "--model", "tiny-org/tiny-llama", "--engine", "reference", "--prompt", "w5 w6",
                 "--max-tokens", "3", "--quiet"]) == 0
    assert "3 tokens in" in capsys.readouterr().err


def test_uncached_id_offline_is_one_line(hub, capsys):
    assert main(["generate", "--model", "tiny-org/not-there", "--engine", "reference"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not in the Hugging Face cache" in err and "HF_HUB_OFFLINE" in err


def test_uncached_id_unreachable_is_one_line(hub, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE")

    def fake(repo_id, local_files_only=False, **kw):
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        raise ConnectionError("Failed to resolve 'huggingface.co'\nmore lines")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    with pytest.raises(CheckpointError, match=r"downloading it failed \(ConnectionError: Failed to resolve"):
        resolve_model("tiny-org/not-there")


def test_bin_only_folder_and_gguf_file(tmp_path, tiny_dir, capsys):
    d = tmp_path / "binonly"
    shutil.copytree(tiny_dir("llama"), d)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    assert main(["generate", "--model", str(d), "--engine", "reference"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "only PyTorch .bin weights" in err and "save_pretrained" in err
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF")
    assert main(["generate", "--model", str(g), "--engine", "reference"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is a GGUF file" in err
