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
