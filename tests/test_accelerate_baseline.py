"""scripts/accelerate_baseline.py: transformers + accelerate offload, timed on bench's job prompts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = str(Path(__file__).resolve().parents[1] / "scripts" / "accelerate_baseline.py")


def test_without_accelerate_it_says_so_in_one_line():
    code = ("import sys, runpy; sys.modules['accelerate'] = None; sys.argv = ['accelerate_baseline.py']; "
            f"runpy.run_path({SCRIPT!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "accelerate_baseline: error: needs the `accelerate` package: pip install 'specoffload[accelerate]' "
        "(or its wheel)"]


def test_bad_folder_is_one_line(tmp_path):
    pytest.importorskip("accelerate")
    r = subprocess.run([sys.executable, SCRIPT, "--model", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not a Hugging Face checkpoint folder" in r.stderr and "Traceback" not in r.stderr


def test_times_a_tiny_checkpoint(tiny_dir):
    pytest.importorskip("accelerate")
    r = subprocess.run([sys.executable, SCRIPT, "--model", str(tiny_dir("mixtral")), "--requests", "3", "--tokens",
                        "3", "--prompt-hi", "40"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads(r.stdout.splitlines()[0])
    assert row["requests"] == 3 and row["tokens"] == 3 and row["tokens_per_s"] > 0 and row["longest_prompt"] <= 40


def test_given_prompts_run_instead_of_the_jobs(tiny_dir, tmp_path):
    """--prompts: what `bench --accelerate` passes (the requests its modes ran); the first
    --requests of them run, and a file that is not a list of token-id lists is one line."""
    pytest.importorskip("accelerate")
    f = tmp_path / "p.json"
    f.write_text(json.dumps([[5, 6, 7, 8, 9], [3, 4, 5, 6, 7, 8, 9, 10, 11], [4] * 30]))
    r = subprocess.run([sys.executable, SCRIPT, "--model", str(tiny_dir("mixtral")), "--prompts", str(f),
                        "--requests", "2", "--tokens", "2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads(r.stdout.splitlines()[0])
    assert row["requests"] == 2 and row["longest_prompt"] == 9
    f.write_text(json.dumps([[1, 2], []]))
    r = subprocess.run([sys.executable, SCRIPT, "--prompts", str(f)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (f"accelerate_baseline: error: --prompts {f}: not a non-empty JSON "
                                                 "list of token-id lists")


def test_a_batch_out_of_gpu_memory_is_halved_until_it_runs(tiny_dir, monkeypatch, capsys):
    """accelerate plans no batch: the script halves it on an out-of-memory error and reports
    the batch that ran beside the one asked for."""
    pytest.importorskip("accelerate")
    import runpy

    import torch
    import transformers

    real = transformers.GenerationMixin.generate
    seen = []

    def generate(self, input_ids, **kw):
        seen.append(input_ids.shape[0])
        if input_ids.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, input_ids, **kw)

    monkeypatch.setattr(transformers.GenerationMixin, "generate", generate)
    monkeypatch.setattr(sys, "argv", [SCRIPT, "--model", str(tiny_dir("mixtral")), "--requests", "8", "--tokens", "2",
                                      "--prompt-hi", "40"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(SCRIPT, run_name="__main__")
    assert e.value.code == 0 and seen == [8, 4, 2]
    out, err = capsys.readouterr()
    row = json.loads(out.splitlines()[0])
    assert row["requests"] == 2 and row["requests_asked"] == 8
    assert "8 prompts (padded to" in err and "trying 4" in err and "Tried to allocate 2.00 GiB" in err
