"""The full Ray actor pipeline on the CPU: token-identical to transformers' generate."""

from __future__ import annotations

import pytest
import ray

from hf_reference import PROMPTS, first_new_token, hf_greedy
from specoffload.configs.sampling_params import SamplingParams
from specoffload.errors import CapacityError, ConfigError
from specoffload.llm import LLM
from specoffload.placement.plan import Plan


def _ids(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


@pytest.mark.parametrize("family,micro_batches,shm", [("llama", 1, True), ("mixtral", 2, True), ("qwen2", 3, True),
                                                      ("llama", 2, False)])
def test_greedy_identical_through_actors(ray_session, tiny_dir, family, micro_batches, shm):
    """micro_batches splits each pass (3 sequences per batch: 1+2 or 1+1+1, then fewer as the
    last batch is smaller); the output must not depend on it, nor on whether activations
    cross through shared-memory mailboxes or Ray's object store (shm False: the plain path)."""
    d = tiny_dir(family)
    want = hf_greedy(d, PROMPTS, 24)
    with LLM(str(d), plan=Plan(device="cpu", shm_activations=shm), batch_size=3, progress=False,
             micro_batches=micro_batches) as llm:
        # the four actors are real, named Ray actors
        names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if isinstance(a, dict)} or \
            set(ray.util.list_named_actors())
        assert any(n.startswith("specoffload-gpu_executor-") for n in names)
        assert any(n.startswith("specoffload-cpu_attention-") for n in names)
        assert any(n.startswith("specoffload-io_loader-") for n in names)
        assert any(n.startswith("specoffload-coordinator-") for n in names)
        outs = llm.generate(_ids(PROMPTS), SamplingParams(max_tokens=24, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == want
    assert all(o.outputs[0].finish_reason == "length" for o in outs)


def test_eos_mid_batch(ray_session, tiny_dir):
    d = tiny_dir("llama")
    free_run = hf_greedy(d, PROMPTS, 20)
    i, stop = first_new_token(free_run[1], 3)  # a token prompt 1 emits mid-run: treat it as EOS
    want = hf_greedy(d, PROMPTS, 20, eos_token_id=[stop, 2])  # 2 is the config's own EOS
    assert len(want[1]) == i + 1 < 20 and any(len(w) == 20 for w in want)  # ragged finish
    # two micro-batches, and sequences leaving mid-run shrink them
    with LLM(str(d), batch_size=4, progress=False, micro_batches=2) as llm:
        outs = llm.generate(_ids(PROMPTS), SamplingParams(max_tokens=20, stop_token_ids=[stop]))
    assert [o.outputs[0].token_ids for o in outs] == want
    assert outs[1].outputs[0].finish_reason == "stop"


def test_bad_input_fails_before_work(tiny_dir, monkeypatch):
    d = tiny_dir("llama")
    llm = LLM(str(d), engine="reference", progress=False)
    with pytest.raises(CapacityError, match="prompt 0 has 250 tokens \\+ max_tokens 10 > the model's context of 256"):
        llm.generate(_ids([[5] * 250]), SamplingParams(max_tokens=10))
    with pytest.raises(ConfigError, match="prompt 1 is empty"):
        llm.generate(_ids([[5], []]))
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        llm.generate(_ids([[500]]))
    import specoffload.llm as llm_mod

    monkeypatch.setattr(llm_mod, "_host_memory_available", lambda: 2**20)  # a 1 MiB host
    with pytest.raises(CapacityError, match=r"KV cache for 64 sequences x 230 tokens needs .* GiB of host memory"):
        llm.generate(_ids([[5] * 20] * 100), SamplingParams(max_tokens=200))


def test_sampled_output_matches_reference_path(ray_session, tiny_dir):
    """Seeded sampling with speculation gives the same tokens on the actors as on the plain path."""
    d = tiny_dir("qwen2")
    params = [SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=11 + i, ignore_eos=True)
              for i in range(len(PROMPTS))]
    ref = LLM(str(d), draft="self:1", engine="reference", progress=False, k=3, batch_size=2)
    want = [o.outputs[0].token_ids for o in ref.generate(_ids(PROMPTS), params)]
    with LLM(str(d), draft="self:1", progress=False, k=3, batch_size=2) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(_ids(PROMPTS), params)]
    assert got == want


def test_disk_tier_layers_stream_from_the_checkpoint(ray_session, tiny_dir):
    """Layers the plan leaves on disk are read per pass from the safetensors file; the output
    is unchanged and the loader put only the other layers into shared memory."""
    from specoffload.placement.plan import Plan

    d = tiny_dir("mixtral")
    want = hf_greedy(d, PROMPTS, 12)
    plan = Plan(device="cpu", disk_layers=(0, 2), batch_size=4, prefill_batch=3)
    with LLM(str(d), plan=plan, progress=False) as llm:
        outs = llm.generate(_ids(PROMPTS), SamplingParams(max_tokens=12, ignore_eos=True))
        host_files = ray.get(llm.coordinator.host_files.remote())
    assert [o.outputs[0].token_ids for o in outs] == want
    assert sorted(host_files) == ["globals.bin", "layer_001.bin"]


def test_actor_start_error_is_the_users_and_leaves_no_weights(ray_session, tiny_dir, monkeypatch):
    """An error the executor raises while starting (after the loader wrote the weights) reaches
    the caller as itself, not as Ray's ActorDiedError, and the weights leave shared memory."""
    import uuid

    import specoffload.llm as llm_mod
    from specoffload.actors.io_loader import run_dir

    run = uuid.UUID("5eed0000000000000000000000000000")
    monkeypatch.setattr(llm_mod.uuid, "uuid4", lambda: run)  # the loader's folder is named by the run id
    with pytest.raises(ConfigError, match="self-speculative draft's 1 layers must not be on disk"):
        LLM(str(tiny_dir("llama")), draft="self:1", plan=Plan(device="cpu", disk_layers=(0,)), progress=False)
    assert not run_dir(run.hex[:8]).exists()


def test_generate_again_after_an_interrupted_run(ray_session, tiny_dir):
    """Ctrl-C in a notebook mid-run: the run stops at a pass boundary and frees its batches;
    the same LLM then runs the next generate to the same output as an undisturbed run."""
    d = tiny_dir("llama")
    want = hf_greedy(d, PROMPTS, 16)

    def interrupt(_):
        raise KeyboardInterrupt

    with LLM(str(d), plan=Plan(device="cpu"), batch_size=1, progress=False) as llm:
        with pytest.raises(KeyboardInterrupt):  # at the first finished request, of several waves
            llm.generate(_ids(PROMPTS), SamplingParams(max_tokens=16, ignore_eos=True), on_output=interrupt)
        outs = llm.generate(_ids(PROMPTS), SamplingParams(max_tokens=16, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == want
