"""`specoffload generate`: prompts from flags and files, JSONL results, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "specoffload.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_generate_writes_jsonl_per_request(tiny_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "w5 w6 w7"}\nw9 w10\n')
    out = tmp_path / "out.jsonl"
    r = _cli("generate", "--model", str(tiny_dir("llama")), "--engine", "reference", "--prompt", "w3",
             "--prompts", str(prompts), "--max-tokens", "5", "--ignore-eos", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    recs = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda x: x["index"])
    assert [x["prompt"] for x in recs] == ["w3", "w5 w6 w7", "w9 w10"]
    assert all(len(x["token_ids"]) == 5 and x["finish_reason"] == "length" for x in recs)
    assert "15 tokens in" in r.stderr


def test_generate_with_gpu_rows_refills_them(tiny_dir, tmp_path):
    """The user's path with --gpu-kv-rows and --refill on the actors: the first row (on the
    "GPU", here the executor's CPU) ends after 2 tokens, the third prompt takes it, the summary
    says so, and the outputs equal the reference engine's (greedy)."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "w5 w6 w7", "max_tokens": 2}\nw9 w10\n{"prompt": "w4", "max_tokens": 7}\n')
    outs = {}
    for engine, extra in (("reference", ()), ("ray", ("--gpu-kv-rows", "1", "--draft", "self:1", "-k", "2"))):
        out = tmp_path / f"{engine}.jsonl"
        r = _cli("generate", "--model", str(tiny_dir("llama")), "--engine", engine, "--prompts", str(prompts),
                 "--max-tokens", "4", "--ignore-eos", "--out", str(out), "--quiet", "--batch-size", "2", "--refill",
                 "--dtype", "float32", *extra)
        assert r.returncode == 0, r.stderr[-2000:]
        outs[engine] = sorted((json.loads(line)["index"], json.loads(line)["token_ids"])
                              for line in out.read_text().splitlines())
    assert "rows refilled 1 times (1 rows into GPU rows)" in r.stderr
    assert outs["ray"] == outs["reference"] and [len(t) for _, t in outs["ray"]] == [2, 4, 7]


def test_a_prompt_line_sets_its_own_max_tokens_and_logprobs_are_written(tiny_dir, tmp_path):
    """A JSONL line's max_tokens over --max-tokens (rows then end at different passes, as a
    batch job's requests do); --logprobs N puts each token's top N, the chosen one first."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "w5 w6 w7", "max_tokens": 2}\nw9 w10\n{"prompt": "w4", "max_tokens": 7}\n')
    out = tmp_path / "out.jsonl"
    r = _cli("generate", "--model", str(tiny_dir("llama")), "--engine", "reference", "--prompts", str(prompts),
             "--max-tokens", "4", "--ignore-eos", "--logprobs", "2", "--out", str(out), "--quiet", "--batch-size", "2",
             "--refill")
    assert r.returncode == 0, r.stderr
    assert "rows refilled 1 times" in r.stderr  # the 2-token row's, by the third prompt
    recs = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda x: x["index"])
    assert [len(x["token_ids"]) for x in recs] == [2, 4, 7]
    for x in recs:
        assert len(x["logprobs"]) == len(x["token_ids"])
        for tok, lp in zip(x["token_ids"], x["logprobs"]):
            assert next(iter(lp)) == str(tok) and 2 <= len(lp) <= 3
            assert lp[str(tok)] == max(lp.values())  # greedy: the chosen token is the most likely
    bad = tmp_path / "bad.jsonl"
    bad.write_text('w1\n{"prompt": "w2", "max_tokens": 0}\n')
    r = _cli("generate", "--model", str(tiny_dir("llama")), "--engine", "reference", "--prompts", str(bad))
    assert r.returncode == 2 and r.stderr.strip().endswith("bad.jsonl:2: 'max_tokens' must be a positive integer, got 0")


def test_generate_bad_prompts_file_and_out_path(tiny_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt field"}\n')
    r = _cli("generate", "--model", str(tiny_dir("llama")), "--engine", "reference", "--prompts", str(bad))
    assert r.returncode == 2 and r.stderr.strip().endswith("bad.jsonl:1: JSON line has no 'prompt' field")
    r = _cli("generate", "--model", str(tiny_dir("llama")), "--engine", "reference", "--prompt", "w3",
             "--out", str(tmp_path / "no" / "such" / "dir.jsonl"))
    assert r.returncode == 2 and "cannot write --out" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for a GPU this machine does not have")
def test_cuda_plan_without_a_gpu_node_is_one_line(tiny_dir, tmp_path):
    """The actors are pinned to one node that can hold the executor: with no GPU in the Ray
    cluster a CUDA plan fails before any actor starts, in one line, exit 2."""
    plan = tmp_path / "cuda.json"
    plan.write_text('{"device": "cuda"}')
    env = dict(os.environ, RAY_AUTH_MODE="disabled", HOME=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "specoffload.cli", "generate", "--model", str(tiny_dir("llama")),
                        "--plan", str(plan), "--prompt", "w3", "--max-tokens", "2"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == ("specoffload: error: no alive Ray node has a GPU for the executor "
                                                 "(plan.device is 'cuda')")


def test_actor_init_errors_are_unwrapped():
    from specoffload.errors import CapacityError, from_actor_init

    msg = ("The actor died because of an error raised in its creation task, ray::Coordinator.__init__()\n"
           "  File \"coordinator.py\", line 38, in __init__\n"
           "specoffload.errors.CapacityError: the target KV cache needs 9.0 GiB")
    e = from_actor_init(RuntimeError(msg))
    assert type(e) is CapacityError and str(e) == "the target KV cache needs 9.0 GiB"
    other = RuntimeError("The actor died unexpectedly before finishing this task.")
    assert from_actor_init(other) is other
