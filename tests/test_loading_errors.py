"""Broken checkpoints give one clear line naming the file; the CLI exits 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from specoffload.errors import CheckpointError
from specoffload.models.checkpoint import Checkpoint


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="model folder not found: .*nope"):
        Checkpoint(tmp_path / "nope")


def test_missing_shard(tiny_dir, tmp_path):
    d = _copy(tiny_dir("llama"), tmp_path / "m")
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    with open(d / "model-00001-of-00002.safetensors", "rb"):
        pass
    from safetensors import safe_open

    with safe_open(str(d / "model-00001-of-00002.safetensors"), "pt") as f:
        names = list(f.keys())
    wm = {n: "model-00001-of-00002.safetensors" for n in names[: len(names) // 2]}
    wm |= {n: "model-00002-of-00002.safetensors" for n in names[len(names) // 2:]}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    with pytest.raises(CheckpointError, match="missing shard .*model-00002-of-00002.safetensors"):
        Checkpoint(d)


def test_truncated_safetensors(tiny_dir, tmp_path):
    d = _copy(tiny_dir("llama"), tmp_path / "m")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file \(truncated"):
        Checkpoint(d)


def test_unknown_architecture(tiny_dir, tmp_path):
    d = _copy(tiny_dir("llama"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json: unsupported architecture 'gpt_neox'"):
        Checkpoint(d)


def test_no_weights(tiny_dir, tmp_path):
    d = _copy(tiny_dir("llama"), tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors files in"):
        Checkpoint(d)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "specoffload.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_missing_model_folder_exits_2(tmp_path):
    r = _cli("generate", "--model", str(tmp_path / "missing"), "--prompt", "hi")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"specoffload: error: model folder not found: {tmp_path / 'missing'}"]


def test_cli_bad_architecture_exits_2(tiny_dir, tmp_path):
    d = _copy(tiny_dir("llama"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "bert"
    (d / "config.json").write_text(json.dumps(cfg))
    r = _cli("generate", "--model", str(d), "--prompt", "hi")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "unsupported architecture 'bert'" in r.stderr


def test_plan_files_load_and_round_trip():
    from pathlib import Path

    from specoffload.placement.plan import Plan

    for f in sorted((Path(__file__).parents[1] / "configs").glob("*.json")):
        p = Plan.from_file(f)
        assert Plan.from_msgpack(p.to_msgpack()) == p
    assert Plan.from_file(Path(__file__).parents[1] / "configs" / "w1_24gib.json").gpu_memory == 24 * 2**30


def test_plan_rejects_bad_settings(tmp_path):
    from specoffload.errors import ConfigError
    from specoffload.placement.plan import Plan

    with pytest.raises(ConfigError, match="num_slots must be >= 2"):
        Plan(num_slots=1)
    with pytest.raises(ConfigError, match="cannot read a size from '24 parsecs'"):
        Plan(gpu_memory="24 parsecs")
    with pytest.raises(ConfigError, match="both GPU-resident and on disk"):
        Plan(gpu_layers=(1,), disk_layers=(1,))
    f = tmp_path / "p.json"
    f.write_text('{"batch_size": 4, "colour": "blue"}')
    with pytest.raises(ConfigError, match="unknown plan field"):
        Plan.from_file(f)


def test_cli_bad_plan_file_exits_2(tiny_dir, tmp_path):
    f = tmp_path / "p.json"
    f.write_text("{not json")
    r = _cli("generate", "--model", str(tiny_dir("llama")), "--plan", str(f), "--prompt", "w5")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "p.json: not valid JSON" in r.stderr
