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


def test_processor_messages_prompts_and_row_params(ray_session, tiny_dir, tmp_path):
    """build_processor as ray.data.llm's: preprocess makes `messages` or `prompt` rows with their
    own sampling_params; each row's output equals the engine's own for that row."""
    from specoffload.ray_data import SpecOffloadProcessorConfig, build_processor

    ray = ray_session
    ray.data.DataContext.get_current().enable_progress_bars = False
    d = str(tiny_dir("llama"))
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }} </s> {% endfor %}w3 "
    cfg = SpecOffloadProcessorConfig(model=d, draft="self:2", batch_size=3, concurrency=1, chat_template=template,
                                     engine_kwargs={"batch_size": 4, "k": 3},
                                     runtime_env={"env_vars": {"SPECOFFLOAD_SHM": str(tmp_path / "shm")}})

    def pre(row):
        if row["id"] % 2:
            return {"id": row["id"], "messages": [{"role": "user", "content": row["text"]}],
                    "sampling_params": {"max_tokens": 4 + row["id"], "temperature": 0.0}}
        return {"id": row["id"], "prompt": row["text"],
                "sampling_params": {"max_tokens": 6, "temperature": 0.0, "stop": ["w9"], "presence_penalty": 0.5}}

    proc = build_processor(cfg, preprocess=pre,
                           postprocess=lambda row: {"id": row["id"], "answer": row["generated_text"],
                                                    "tokens": list(row["generated_tokens"]),
                                                    "n_in": row["num_input_tokens"], "why": row["finish_reason"]})
    texts = ["w5 w7 w9", "w40 w41", "w60 w61 w62", "w11 w12", "w20"]
    rows = sorted(proc(ray.data.from_items([{"id": i, "text": t} for i, t in enumerate(texts)])).take_all(),
                  key=lambda r: r["id"])
    assert [r["id"] for r in rows] == list(range(5))
    from specoffload.chat import render

    llm = LLM(d, engine="reference", progress=False)
    for r, t in zip(rows, texts):
        i = r["id"]
        if i % 2:
            inp = render(llm.tokenizer, [{"role": "user", "content": t}], template)
            sp = SamplingParams(max_tokens=4 + i)
        else:
            inp, sp = t, SamplingParams(max_tokens=6, stop=["w9"], presence_penalty=0.5)
        want = llm.generate([inp], sp)[0]
        assert (r["answer"], r["tokens"], r["why"]) == (want.outputs[0].text, want.outputs[0].token_ids,
                                                        want.outputs[0].finish_reason)
        assert r["n_in"] == len(want.prompt_token_ids)


def test_processor_caps_engines_per_node():
    """One GPU: concurrency 2 would put two engines' weights in one host's /dev/shm (and on one
    GPU); the cap counts GPUs and free shared memory per node."""
    from specoffload.ray_data import engine_slots

    one_gpu = [{"id": "a", "gpus": 1, "shm_free": 100 << 30}]
    assert engine_slots(one_gpu, 10 << 30, cuda=True) == {"a": 1}
    assert engine_slots(one_gpu, 40 << 30, cuda=False) == {"a": 2}
    assert engine_slots([{"id": "a", "gpus": 8, "shm_free": 100 << 30}], 60 << 30, cuda=True) == {"a": 1}


def test_reservation_counts_engines_still_loading(tmp_path):
    from specoffload.errors import CapacityError
    from specoffload.ray_data import _Reservation, shm_free

    free = shm_free(str(tmp_path))
    a = _Reservation(int(free * 0.6), tmp_path)
    with pytest.raises(CapacityError, match="lower concurrency"):
        _Reservation(int(free * 0.6), tmp_path)  # the first one's promise is still held
    a.release()
    _Reservation(int(free * 0.6), tmp_path).release()
