"""Fit before load: host memory (free /dev/shm, MemAvailable; a patched reader here) checked
against the target layers kept in host memory plus the KV cache before any actor starts; the
rest goes to the disk tier, or a one-line error names the numbers."""

from __future__ import annotations

import pytest

from hf_reference import PROMPTS, hf_greedy
from specoffload.cli import main
from specoffload.configs.sampling_params import SamplingParams
from specoffload.errors import CapacityError
from specoffload.llm import LLM
from specoffload.models.spec import load_spec
from specoffload.placement import host_fit
from specoffload.placement.cost_model import glob_bytes
from specoffload.placement.plan import Plan

GiB = 2**30


def _sizes(d):
    spec = load_spec(d)
    return spec, spec.layer_param_count() * spec.torch_dtype.itemsize, glob_bytes(spec)


def _patch(monkeypatch, shm, avail):
    monkeypatch.setattr(host_fit, "host_memory", lambda: (shm, avail))


def test_plenty_of_memory_changes_nothing(tiny_dir, monkeypatch):
    spec, _, _ = _sizes(tiny_dir("llama"))
    _patch(monkeypatch, 64 * GiB, 64 * GiB)
    plan = Plan(device="cpu")
    assert host_fit.fit_before_load(spec, plan, 64, 2048) is plan


def test_short_shm_puts_the_last_layers_on_disk(tiny_dir, monkeypatch):
    spec, layer, glob = _sizes(tiny_dir("llama"))
    _patch(monkeypatch, glob + layer + layer // 2, 64 * GiB)  # /dev/shm holds one layer and the globals
    assert host_fit.fit_before_load(spec, Plan(device="cpu"), 4, 64, quiet=True).disk_layers == (1, 2)
    # a self-speculative draft's first layer stays; with 2 it cannot fit
    assert host_fit.fit_before_load(spec, Plan(device="cpu"), 4, 64, keep=1, quiet=True).disk_layers == (1, 2)
    with pytest.raises(CapacityError, match=r"need .* GiB of /dev/shm"):
        host_fit.fit_before_load(spec, Plan(device="cpu"), 4, 64, keep=2, quiet=True)


def test_kv_cache_counts_against_mem_available(tiny_dir, monkeypatch):
    spec, layer, glob = _sizes(tiny_dir("llama"))
    kv = host_fit.kv_bytes(spec, Plan(device="cpu"), 64, 2048)
    _patch(monkeypatch, 64 * GiB, host_fit.HOST_RESERVE + kv + glob + 2 * layer + 1)
    assert host_fit.fit_before_load(spec, Plan(device="cpu"), 64, 2048, quiet=True).disk_layers == (2,)


def test_spilled_run_is_still_exact(ray_session, tiny_dir, monkeypatch):
    d = tiny_dir("llama")
    spec, layer, glob = _sizes(d)
    _patch(monkeypatch, glob + 2 * layer + layer // 2, 64 * GiB)
    want = hf_greedy(d, PROMPTS, 8)
    with LLM(str(d), draft="self:1", k=2, batch_size=4, progress=False) as llm:
        assert llm.plan.disk_layers == (2,)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(max_tokens=8, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == want


def test_cli_too_little_memory_is_one_line(tiny_dir, monkeypatch, capsys):
    _patch(monkeypatch, 1024, 64 * GiB)  # not even the globals fit
    assert main(["generate", "--model", str(tiny_dir("llama")), "--prompt", "w5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "host memory too small" in err and "GiB free" in err


def test_checked_prompts_size_the_kv_cache(tiny_dir, monkeypatch):
    # The CLI checks its prompts before start(): the fit then sizes the KV cache by the longest
    # sequence, not by LOAD_CONTEXT.
    d = tiny_dir("llama")
    spec, layer, glob = _sizes(d)
    llm = LLM(str(d), batch_size=64, progress=False, start=False)
    llm.check([{"prompt_token_ids": [1, 5, 6]}], SamplingParams(max_tokens=5))
    assert llm._context == 3 + 5 + llm.run_cfg.k_max + 2
    kv = host_fit.kv_bytes(spec, llm.plan, 64, llm._context)
    _patch(monkeypatch, 64 * GiB, host_fit.HOST_RESERVE + glob + 3 * layer + kv + 1)
    assert host_fit.fit_for_llm(spec, llm.plan, "none", None, None, False, llm._context).disk_layers == ()
    with pytest.raises(CapacityError, match="64 sequences x 256 tokens"):  # LOAD_CONTEXT, capped by the context
        host_fit.fit_for_llm(spec, llm.plan, "none", None, None, False)
