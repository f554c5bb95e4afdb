"""`specoffload generate`: prompts from flags and files, JSONL results, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys


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


def test_generate_bad_prompts_file_and_out_path(tiny_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt field"}\n')
    r = _cli("generate", "--model", str(tiny_dir("llama")), "--engine", "reference", "--prompts", str(bad))
    assert r.returncode == 2 and r.stderr.strip().endswith("bad.jsonl:1: JSON line has no 'prompt' field")
    r = _cli("generate", "--model", str(tiny_dir("llama")), "--engine", "reference", "--prompt", "w3",
             "--out", str(tmp_path / "no" / "such" / "dir.jsonl"))
    assert r.returncode == 2 and "cannot write --out" in r.stderr and "Traceback" not in r.stderr
