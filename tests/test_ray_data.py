"""Ray Data: SpecOffloadPredictor in map_batches, one engine replica per Ray Data actor."""

from __future__ import annotations

import time

import numpy as np
import pytest


from specoffload.configs.sampling_params import SamplingParams
from specoffload.errors import ConfigError
from specoffload.llm import LLM
from specoffload.ray_data import SpecOffloadPredictor

PROMPTS = ["hello world", "the quick brown fox", "one two three", "a b c d e f", "seven", "lorem ipsum dolor"]


def test_map_batches_greedy_matches_llm(ray_session, tiny_dir, tmp_path):
    ray = ray_session
    ray.data.DataContext.get_current().enable_progress_bars = False
    d = str(tiny_dir("llama"))
    shm = tmp_path / "shm"  # the engine's weight files go here (the loader creates it)
    ds = ray.data.from_items([{"id": i, "prompt": p} for i, p in enumerate(PROMPTS)])
    ds = ds.map_batches(
        SpecOffloadPredictor,
        fn_constructor_kwargs={"model": d, "draft": "self:2", "max_tokens": 10, "batch_size": 4},
        concurrency=1,  # one engine replica
        num_cpus=0,  # the map actor only drives the engine; its actors take the CPUs
        batch_size=3,
        runtime_env={"env_vars": {"SPECOFFLOAD_SHM": str(shm)}},  # inherited by the engine's actors
    )
    rows = sorted(ds.take_all(), key=lambda r: r["id"])
    assert [r["prompt"] for r in rows] == PROMPTS
    assert all(isinstance(r["generated_text"], str) and r["generated_text"] for r in rows)
    assert all(r["num_tokens"] == len(r["token_ids"]) and 1 <= r["num_tokens"] <= 10 for r in rows)

    # When Ray Data lets its actor go, the predictor's __del__ stops its engine, which removes
    # its shared-memory weight files (asynchronously, after take_all returned).
    assert shm.is_dir()
    deadline = time.time() + 30
    while time.time() < deadline and any(shm.iterdir()):
        time.sleep(0.5)
    assert not any(shm.iterdir()), list(shm.iterdir())

    # Greedy: the same tokens as the engine used directly.
    with LLM(d, batch_size=4, progress=False) as llm:
        direct = llm.generate(PROMPTS, SamplingParams(max_tokens=10))
    assert [list(r["token_ids"]) for r in rows] == [o.outputs[0].token_ids for o in direct]
    assert [r["generated_text"] for r in rows] == [o.outputs[0].text for o in direct]


def test_predictor_call_in_process(tiny_dir):
    """The UDF contract without Ray Data: numpy batch in, batch + new columns out."""
    p = SpecOffloadPredictor(str(tiny_dir("llama")), max_tokens=5, sampling={"ignore_eos": True}, engine="reference")
    out = p({"prompt": np.array(PROMPTS[:2], dtype=object), "id": np.array([7, 8])})
    assert list(out["id"]) == [7, 8] and list(out["prompt"]) == PROMPTS[:2]
    assert out["num_tokens"].dtype == np.int64 and list(out["num_tokens"]) == [5, 5]
    assert [len(t) for t in out["token_ids"]] == [5, 5]
    with pytest.raises(ConfigError, match="no 'prompt' column"):
        p({"text": np.array(["x"], dtype=object)})
    p.shutdown()
