"""Shared fixtures: tiny checkpoints of every family, and one local Ray for the session.

Ray 2.60 enables token auth and keeps its token under the user's home; tests run Ray with
auth off and a private temp dir so they depend on nothing in $HOME, and without the dashboard.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("SPECOFFLOAD_DASHBOARD", "0")  # local clusters the CLI starts: seconds sooner
sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import make_tiny_with_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """family -> folder of a tiny random checkpoint with a tokenizer (made once)."""
    root = tmp_path_factory.mktemp("tiny")
    made = {}

    def get(family: str, seed: int = 0, **over) -> Path:
        key = (family, seed, tuple(sorted(over.items())))
        if key not in made:
            name = f"{family}-{seed}-" + "-".join(f"{k}{v}" for k, v in sorted(over.items()))
            made[key] = make_tiny_with_tokenizer(family, root / name, seed, **over)
        return made[key]

    return get


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, object_store_memory=300 * 2**20,
                 _temp_dir=str(tmp_path_factory.mktemp("ray")), log_to_driver=False)
    yield ray
    ray.shutdown()


# fp8 checkpoints in the block format get several 128x128 blocks per matrix. Multiples of 128:
# transformers' CPU dequantize takes the block size as rows // scale rows, wrong for a partial
# last block (real checkpoints have none); test_fp8_target checks ours on partial blocks.
BLOCK_SHAPES = dict(hidden_size=256, intermediate_size=384)


@pytest.fixture(scope="session")
def fp8_dir(tiny_dir, tmp_path_factory):
    """(family, format) -> an fp8 checkpoint folder made from a tiny one (made once; formats
    in tests/fp8_checkpoints.py)."""
    root, made = tmp_path_factory.mktemp("fp8"), {}

    def get(family: str, fmt: str):
        if (family, fmt) not in made:
            from fp8_checkpoints import write_fp8

            over = BLOCK_SHAPES if fmt == "block" else {}
            made[family, fmt] = write_fp8(tiny_dir(family, **over), root / f"{family}-{fmt}", fmt)
        return made[family, fmt]

    return get
