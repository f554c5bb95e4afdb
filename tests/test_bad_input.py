"""Bad input as a table: each row is one line on stderr (`specoffload: error: ...`), exit 2, no
traceback, and a results file that already holds finished work is left byte for byte.

Rows run `cli.main` in-process (the reference engine where the row fails before any actor
would start; the Ray engine where the check is the driver's own, before Ray); a few rows run
the command end to end in a subprocess, through the actors. Checkpoint rows the older tests
cover (truncated file, missing shard, unknown model_type, missing folder via subprocess) are
in tests/test_loading_errors.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from specoffload.cli import main
from specoffload.configs.sampling_params import SamplingParams
from specoffload.results_journal import request_key

PROMPTS = ["w3 w4", "w5"]


def _tensor_edit(fn):
    """A checkpoint mutation: edit the state dict of model.safetensors."""
    def edit(d: Path):
        sd = load_file(d / "model.safetensors")
        fn(sd)
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    return edit


def _set(name, value):
    return _tensor_edit(lambda sd: sd.__setitem__(name, value(sd[name])))


def _config(**kv):
    def edit(d: Path):
        c = json.loads((d / "config.json").read_text())
        c.update(kv)
        (d / "config.json").write_text(json.dumps(c))
    return edit


def _other_tokenizer(d: Path):
    """The draft: same model, same vocabulary size, other words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"x{i}": i for i in range(3, 96)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    for f in d.glob("tokenizer*"):
        f.unlink()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<pad>").save_pretrained(d)


def _write(name, data, flag="--prompts"):
    """Extra args: `flag` and a file `name` in the test's folder holding `data`."""
    def args(tmp):
        (tmp / name).write_bytes(data if isinstance(data, bytes) else data.encode())
        return [flag, str(tmp / name)]
    return args


def _small(monkeypatch, what):
    import specoffload.actors.shm_owners as so
    import specoffload.llm as llm_mod

    if what == "fresh":  # a driver not yet joined to any Ray (this test process may have joined one)
        import ray

        monkeypatch.setattr(ray, "is_initialized", lambda: False)
    elif what == "host":
        monkeypatch.setattr(llm_mod, "_host_memory_available", lambda: 1024)
    else:
        monkeypatch.setattr(so, "shm_free_bytes", lambda root=None: 4096)


# id: (checkpoint edit or None, extra args (fn of tmp) or list, patch, expected stderr text, seeded --out)
ROWS = {
    "model_missing": ("missing", [], None, "model folder not found", True),
    "config_not_json": (lambda d: (d / "config.json").write_text("{oops"), [], None, "config.json: not valid JSON", True),
    "config_unreadable": (lambda d: ((d / "config.json").unlink(), (d / "config.json").mkdir()), [], None,
                          "no config.json in", True),
    "config_no_model_type": (lambda d: ((d / "config.json").write_text(json.dumps(
        {k: v for k, v in json.loads((d / "config.json").read_text()).items() if k != "model_type"}))), [], None,
        "unsupported architecture None", True),
    "arch_unsupported_family": (_config(model_type="gpt2"), [], None, "unsupported architecture 'gpt2'", True),
    "weights_bad_header": (lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 8 + b"{not a header"), [], None,
                           "model.safetensors: not a readable safetensors file", True),
    "weights_empty_file": (lambda d: (d / "model.safetensors").write_bytes(b""), [], None,
                           "not a readable safetensors file", True),
    "weights_wrong_dtype": (_set("model.layers.1.self_attn.q_proj.weight", lambda t: (t * 100).to(torch.int32)), [],
                            None, "tensor model.layers.1.self_attn.q_proj.weight has dtype int32", True),
    "weights_wrong_shape": (_set("model.layers.0.self_attn.k_proj.weight", lambda t: t[:16].contiguous()), [], None,
                            "layer 0 tensor k has shape [16, 64], the config implies [32, 64]", True),
    "weights_nan_in_layer": (_set("model.layers.2.mlp.down_proj.weight",
                                  lambda t: t.index_fill(1, torch.tensor([5]), float("nan"))), [], None,
                             "tensor model.layers.2.mlp.down_proj.weight holds NaN or infinite values", True),
    "weights_inf_in_head": (_set("lm_head.weight", lambda t: t.index_fill(0, torch.tensor([7]), float("inf"))), [],
                            None, "tensor lm_head.weight holds NaN or infinite values", True),
    "embed_wrong_vocab": (_config(vocab_size=90), [], None, "embed has shape [96, 64], the config implies [90, 64]",
                          True),
    "draft_other_tokenizer": ("draft", lambda tmp: ["--draft", str(tmp / "draft")], None,
                              "have different tokenizers", True),
    "draft_other_vocab_size": ("draft128", lambda tmp: ["--draft", str(tmp / "draft")], None,
                               "has vocab 128, target", True),
    "draft_self_zero": (None, ["--draft", "self:0"], None, "--draft self:N needs 1 <= N < 3", True),
    "prompts_empty_file": (None, _write("p.txt", b""), None, "p.txt: no prompts", False),
    "prompts_only_blank": (None, _write("p.txt", "  \n\n\t\n"), None, "p.txt: no prompts", False),
    "prompts_not_utf8": (None, _write("p.txt", b"w3 w4\n\xff\xfe w5\n"), None, "p.txt:2: not UTF-8 text (byte 0xff)",
                         False),
    "prompts_binary": (None, _write("p.bin", b"w3\nw4\x00\x01\x02\x03"), None, "p.bin:2: NUL byte: not a text file",
                       False),
    "prompts_missing": (None, lambda tmp: ["--prompts", str(tmp / "nope.txt")], None, "prompts file not found", False),
    "prompts_is_a_folder": (None, lambda tmp: ["--prompts", str(tmp)], None, "is not a file", False),
    "jsonl_broken_line": (None, _write("p.jsonl", '{"prompt": "w3"}\nw4\n{"prompt": "w5"\n'), None,
                          "p.jsonl:3: not valid JSON", False),
    "jsonl_prompt_not_string": (None, _write("p.jsonl", '{"prompt": "w3"}\n{"prompt": 5}\n'), None,
                                "p.jsonl:2: 'prompt' must be a string, got int", False),
    "prompts_huge_file": (None, _write("p.txt", "w5 " * 350_000), None,
                          "prompt 2 has 350000 tokens + max_tokens 4 > the model's context of 256", False),
    "prompt_longer_than_context": (None, ["--prompt", "w7 " * 253], None,
                                   "prompt 2 has 253 tokens + max_tokens 4 > the model's context of 256", True),
    "max_tokens_zero": (None, ["--max-tokens", "0"], None, "max_tokens must be a positive integer, got 0", False),
    "max_tokens_negative": (None, ["--max-tokens", "-3"], None, "max_tokens must be a positive integer", False),
    "temperature_negative": (None, ["--temperature", "-0.5"], None, "temperature must be >= 0", False),
    "temperature_nan": (None, ["--temperature", "nan"], None, "temperature must be >= 0 and finite, got nan", False),
    "temperature_inf": (None, ["--temperature", "inf"], None, "temperature must be >= 0 and finite, got inf", False),
    "top_p_zero": (None, ["--top-p", "0"], None, "top_p must be in (0, 1], got 0.0", False),
    "top_p_above_one": (None, ["--top-p", "1.5"], None, "top_p must be in (0, 1]", False),
    "top_p_nan": (None, ["--top-p", "nan"], None, "top_p must be in (0, 1], got nan", False),
    "top_k_below_off": (None, ["--top-k", "-2"], None, "top_k must be -1 or 0 (off) or a positive integer", False),
    "seed_negative": (None, ["--seed", "-1", "--temperature", "0.7"], None, "seed must be an integer in [0, 2**63)",
                      False),
    "draft_length_zero": (None, ["--draft", "self:1", "-k", "0"], None, "draft length k must be in 1..16", True),
    "batch_size_zero": (None, ["--batch-size", "0"], None, "batch_size and prefill_batch must be >= 1", True),
    "gpu_memory_unparseable": (None, ["--gpu-memory", "lots"], None, "cannot read a size from 'lots'", True),
    "plan_not_json": (None, _write("plan.json", "batch_size: 4\n", "--plan"), None, "plan.json: not valid JSON", True),
    "plan_layers_do_not_fit": (None, _write("plan.json", '{"disk_layers": [7]}', "--plan"), None,
                               "plan names layers [7] but the model has 3", True),
    "plan_unknown_field": (None, _write("plan.json", '{"colour": "blue"}', "--plan"), None, "unknown plan field", True),
    "host_memory_too_small": (None, [], "host", "needs 0.0 GiB of host memory and 0.0 GiB is available", True),
    "shm_too_small": (None, ["--engine", "ray"], "shm", "host weights need 0.00 GiB in", True),
    "ray_address_dead": (None, ["--engine", "ray", "--ray-address", "127.0.0.1:9"], "fresh",
                         "nothing answers there", True),
    "fuzz_empty_prompt": (None, ["--prompt", ""], None, "prompt 2 is empty", True),
    "out_is_a_folder": (None, lambda tmp: ["--out", str(tmp)], None, "it is a directory", False),
    "out_other_results": (None, _write("o.jsonl", json.dumps({"index": 0, "key": "0123456789abcdef"}) + "\n", "--out"),
                          None, "holds results for other prompts or parameters (line 1, index 0)", False),
    "out_not_a_results_file": (None, _write("o.txt", "my notes\nmore notes\n", "--out"), None,
                               "line 1 is not a result line of specoffload", False),
}


def _model(tiny_dir, tmp: Path, edit):
    good = tiny_dir("llama")
    if edit is None:
        return good
    if edit == "missing":
        return tmp / "no-such-model"
    d = tmp / "model"
    shutil.copytree(good, d)
    if edit == "draft":
        shutil.copytree(good, tmp / "draft")
        _other_tokenizer(tmp / "draft")
    elif edit == "draft128":
        shutil.copytree(tiny_dir("llama", vocab_size=128), tmp / "draft")
    else:
        edit(d)
    return d


def _seed_out(out: Path, model: Path, max_tokens: int = 4) -> bytes:
    """A results file holding request 0, as a run before this one finished it."""
    salt = json.dumps({"model": str(model.resolve()), "chat": False})
    line = json.dumps({"index": 0, "key": request_key(PROMPTS[0], SamplingParams(max_tokens=max_tokens), salt),
                       "prompt": PROMPTS[0], "text": "w9", "token_ids": [9], "finish_reason": "length"}) + "\n"
    out.write_text(line)
    return line.encode()


@pytest.mark.parametrize("row", list(ROWS))
def test_bad_input_is_one_line(row, tiny_dir, tmp_path, capsys, monkeypatch):
    edit, extra, patch, want, seeded = ROWS[row]
    model = _model(tiny_dir, tmp_path, edit)
    extra = extra(tmp_path) if callable(extra) else list(extra)
    out = tmp_path / "results.jsonl"
    argv = ["generate", "--model", str(model), "--engine", "reference", "--quiet", "--no-chat-template",
            "--max-tokens", "4", *[a for p in PROMPTS for a in ("--prompt", p)], "--out", str(out), *extra]
    before = _seed_out(out, model) if seeded else None
    if patch:
        _small(monkeypatch, patch)
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2, err
    assert "Traceback" not in err
    assert lines[-1].startswith("specoffload: error: ") and want in lines[-1], err
    assert [x for x in lines if "error" in x] == [lines[-1]]  # one error line
    if seeded:  # finished work kept as it was
        assert out.read_bytes() == before


def test_table_has_enough_rows():
    assert len(ROWS) >= 25


FUZZ = {
    "control_characters": "w3 \x01\x02\x1b[31m w4 \x7f",
    "mixed_scripts": "w3 héllo мир 你好 مرحبا 🙂 w5",
    "only_whitespace_and_marks": " \u200b\u200d\ufeff w6",
    "long_but_fits": "w9 " * 200,
}


@pytest.mark.parametrize("name", list(FUZZ))
def test_fuzz_prompts_generate_or_fail_in_one_line(name, tiny_dir, tmp_path, capsys):
    """Odd but valid text runs (unknown words map to the tokenizer's unknown id); nothing raises."""
    out = tmp_path / "o.jsonl"
    rc = main(["generate", "--model", str(tiny_dir("llama")), "--engine", "reference", "--quiet",
               "--no-chat-template", "--max-tokens", "3", "--prompt", FUZZ[name], "--out", str(out)])
    err = capsys.readouterr().err
    assert "Traceback" not in err and rc == 0, err
    rec = json.loads(out.read_text())
    assert rec["prompt"] == FUZZ[name] and 1 <= len(rec["token_ids"]) <= 3


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "specoffload.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def test_end_to_end_nan_weights_through_the_actors(ray_session, tiny_dir, tmp_path):
    """The loader actor finds the NaN; the user sees its line, not Ray's ActorDiedError, and the
    failed start leaves no shared-memory folder (the driver records its pid in the folder it owns)."""
    import os

    from specoffload.actors.io_loader import default_shm_root

    d = _model(tiny_dir, tmp_path, ROWS["weights_nan_in_layer"][0])
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)  # this session's cluster
    p = subprocess.Popen([sys.executable, "-m", "specoffload.cli", "generate", "--model", str(d), "--prompt", "w3",
                          "--max-tokens", "2", "--quiet", "--device", "cpu"], stderr=subprocess.PIPE, text=True, env=env)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith(
        f"specoffload: error: {d / 'model.safetensors'}: tensor model.layers.2.mlp.down_proj.weight holds NaN or "
        f"infinite values (actor tracebacks: ")
    for f in default_shm_root().glob("specoffload-*/owners.json"):
        try:
            assert p.pid not in [o["pid"] for o in json.loads(f.read_text())], f
        except FileNotFoundError:  # another run's folder going away
            pass


def test_end_to_end_prompt_file_not_utf8(tiny_dir, tmp_path):
    p = tmp_path / "p.txt"
    p.write_bytes("w3\nw4 caf\xe9\n".encode("latin-1"))
    r = _cli("generate", "--model", str(tiny_dir("llama")), "--prompts", str(p), "--out", str(tmp_path / "o.jsonl"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"specoffload: error: {p}:2: not UTF-8 text (byte 0xe9); convert it, "
                                             f"e.g. iconv -t utf-8"]
    assert not (tmp_path / "o.jsonl").exists()
