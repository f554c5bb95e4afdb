"""vLLM's offline API: a vLLM script run unchanged but for its import, logprobs against
transformers, stop strings across token boundaries, penalties with and without speculation,
n samples, and one-line errors for what is not supported."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from hf_reference import hf_greedy, hf_model
from specoffload.configs.run_config import RunConfig
from specoffload.configs.sampling_params import SamplingParams
from specoffload.errors import ConfigError
from specoffload.llm import LLM
from specoffload.models.checkpoint import Checkpoint
from specoffload.models.resident import ResidentModel
from specoffload.scheduler.generator import Generator
from specoffload.scheduler.reference_backend import ReferenceBackend
from specoffload.scheduler.request import Request

# A chat template for the tiny word-level tokenizer (it has none of its own).
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}w3 {% endif %}")

VLLM_SCRIPT = '''
from vllm import LLM, SamplingParams

prompts = ["w20 w21 w22", "w40 w41 w42", "w5 w7 w9 w11"]
sampling_params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=2)
llm = LLM(model=MODEL, tensor_parallel_size=1, gpu_memory_utilization=0.9, seed=0)
outputs = llm.generate(prompts, sampling_params)
for output in outputs:
    prompt = output.prompt
    generated_text = output.outputs[0].text
    print(f"Prompt: {prompt!r}, Generated text: {generated_text!r}")

conversation = [{"role": "system", "content": "w20 w21"}, {"role": "user", "content": "w30 w31 w32"}]
chat_outputs = llm.chat(conversation, sampling_params=SamplingParams(temperature=0, max_tokens=8),
                        chat_template=TEMPLATE)
stop_outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, stop=[STOP]))
n_outputs = llm.generate(prompts[:1], SamplingParams(n=3, temperature=0.8, seed=0, max_tokens=6))
default_outputs = llm.generate(prompts[:1])      # vLLM's defaults: temperature 1.0, 16 tokens
'''


@pytest.fixture(scope="module")
def engine(tiny_dir):
    """draft -> one in-process engine on the tiny llama, shared by this module's tests."""
    made = {}

    def get(draft=None):
        if draft not in made:
            made[draft] = LLM(str(tiny_dir("llama")), draft=draft, k=4, engine="reference", progress=False)
        return made[draft]

    return get


def _hf_logprobs(folder, ids: list[int], n_prompt: int) -> torch.Tensor:
    """transformers' log-softmax at each generated position of `ids` (prompt + output)."""
    with torch.no_grad():
        logits = hf_model(str(folder))(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1)[n_prompt - 1:len(ids) - 1]


def _check_logprobs(folder, out, n: int):
    c = out.outputs[0]
    assert len(c.logprobs) == len(c.token_ids)
    want = _hf_logprobs(folder, out.prompt_token_ids + c.token_ids, len(out.prompt_token_ids))
    for pos, (tok, d) in enumerate(zip(c.token_ids, c.logprobs)):
        assert next(iter(d)) == tok  # the chosen token first, as vLLM orders it
        assert abs(d[tok].logprob - float(want[pos, tok])) < 1e-4
        assert d[tok].rank == int((want[pos] > want[pos, tok]).sum()) + 1
        top = torch.topk(want[pos], n)
        tops = [t for t in d if d[t].rank <= n and (t != tok or d[t].rank <= n)]
        assert sorted(tops) == sorted(top.indices.tolist()) or len(set(top.values.tolist())) < n
        for t, v in zip(top.indices.tolist(), top.values.tolist()):
            assert abs(d[t].logprob - v) < 1e-4
    assert abs(c.cumulative_logprob - sum(d[t].logprob for t, d in zip(c.token_ids, c.logprobs))) < 1e-4


def test_vllm_script_runs_unchanged_but_its_import(ray_session, tiny_dir, engine, capsys):
    d = tiny_dir("llama")
    # A stop string across the boundary of two tokens of the first prompt's greedy output.
    ref_llm = engine()
    ref = ref_llm.generate(["w20 w21 w22"], SamplingParams(max_tokens=12))[0].outputs[0]
    words = ref.text.split(" ")
    assert len(words) >= 4, ref.text
    stop = words[1][-1] + " " + words[2][:2]
    script = VLLM_SCRIPT.replace("from vllm import", "from specoffload.vllm import")
    env = {"MODEL": str(d), "TEMPLATE": TEMPLATE, "STOP": stop}
    exec(compile(script, "vllm_script.py", "exec"), env)
    llm = env["llm"]
    try:
        outs = env["outputs"]
        assert "Generated text" in capsys.readouterr().out
        # Greedy: transformers' own generate (cut after EOS, as the engine stops there).
        want = hf_greedy(d, [o.prompt_token_ids for o in outs], 12, eos_token_id=2)
        assert [o.outputs[0].token_ids for o in outs] == want
        assert [o.request_id for o in outs] == ["0", "1", "2"]
        assert [o.prompt for o in outs] == ["w20 w21 w22", "w40 w41 w42", "w5 w7 w9 w11"]
        for o in outs:
            assert o.outputs[0].finish_reason in ("stop", "length") and o.outputs[0].index == 0
            _check_logprobs(d, o, 2)
        # chat: the template's text, tokenized as it is written (its BOS included once)
        (ch,) = env["chat_outputs"]
        assert ch.prompt == "<s>w20 w21 </s> w30 w31 w32 </s> w3 "
        assert ch.prompt_token_ids == [1, 20, 21, 2, 30, 31, 32, 2, 3]
        assert ch.outputs[0].token_ids == hf_greedy(d, [ch.prompt_token_ids], 8, eos_token_id=2)[0]
        # stop string (matched in the coordinator, on detokenized text)
        s0 = env["stop_outputs"][0].outputs[0]
        assert (s0.finish_reason, s0.stop_reason) == ("stop", stop)
        assert s0.text == ref.text[:ref.text.index(stop)] and s0.token_ids == ref.token_ids[:3]
        assert s0.logprobs is None and s0.cumulative_logprob is None
        # n samples of one prompt: seed, seed + 1, seed + 2
        (nout,) = env["n_outputs"]
        assert [c.index for c in nout.outputs] == [0, 1, 2]
        singles = ref_llm.generate(["w20 w21 w22"] * 3, [SamplingParams(temperature=0.8, seed=s, max_tokens=6)
                                                          for s in range(3)])
        assert [c.token_ids for c in nout.outputs] == [o.outputs[0].token_ids for o in singles]
        (dflt,) = env["default_outputs"]
        assert len(dflt.outputs[0].token_ids) <= 16
    finally:
        llm.shutdown()


@pytest.mark.parametrize("draft,temperature", [(None, 0.0), ("self:2", 0.0), ("self:2", 1.0)])
def test_logprobs_equal_transformers(tiny_dir, engine, draft, temperature):
    """The target's log-softmax at every emitted position, accepted draft tokens included,
    greedy and sampled (raw logprobs: before temperature)."""
    d = tiny_dir("llama")
    llm = engine(draft)
    prompts = ["w5 w7 w9 w11", "w40 w41 w42", "w60 w61 w62 w63 w64"]
    outs = llm.generate(prompts, SamplingParams(max_tokens=14, temperature=temperature, seed=3, logprobs=3,
                                                ignore_eos=True))
    for o in outs:
        assert len(o.outputs[0].token_ids) == 14
        _check_logprobs(d, o, 3)
    if draft:
        assert llm.last_stats["acceptance"] > 0  # drafts were accepted, so blocks were checked


@pytest.mark.parametrize("draft,include", [(None, False), ("self:2", True)])
def test_stop_string_across_token_boundary(tiny_dir, engine, draft, include):
    d = tiny_dir("llama")
    llm = engine(draft)
    base = llm.generate(["w40 w41 w42"], SamplingParams(max_tokens=16, ignore_eos=True))[0].outputs[0]
    words = base.text.split(" ")
    # The stop string ends in token i + 1 (i >= 5: with k = 4 it falls inside an accepted block).
    i = next(i for i in range(5, 14) if words[i][-1] + " " + words[i + 1][:2] not in " ".join(words[:i + 1]))
    stop = words[i][-1] + " " + words[i + 1][:2]
    c = llm.generate(["w40 w41 w42"], SamplingParams(max_tokens=16, ignore_eos=True, stop=["w999", stop],
                                                     include_stop_str_in_output=include))[0].outputs[0]
    at = base.text.index(stop)
    assert c.text == base.text[:at + (len(stop) if include else 0)]
    assert c.token_ids == base.token_ids[:i + 2]  # through the token that completed the stop
    assert (c.finish_reason, c.stop_reason) == ("stop", stop)
    # min_tokens: stop strings are not checked before, so the output runs past the same match
    late = llm.generate(["w40 w41 w42"], SamplingParams(max_tokens=16, ignore_eos=True, stop=[stop],
                                                        min_tokens=i + 2))[0].outputs[0]
    assert late.token_ids[:i + 2] == base.token_ids[:i + 2] and len(late.token_ids) > i + 2


@functools.lru_cache(maxsize=None)
def _penalized_greedy(folder, prompt: tuple, n, rep, pres, freq, min_tokens=0, eos=2):
    """Plain decoding with vLLM's penalties, recomputing transformers' logits each token."""
    m, ids, out = hf_model(folder), list(prompt), []
    for _ in range(n):
        with torch.no_grad():
            x = m(torch.tensor([ids])).logits[0, -1].float()
        seen = torch.zeros_like(x, dtype=torch.bool)
        seen[ids] = True
        x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
        cnt = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=x.shape[0]).float() if out else 0 * x
        x = x - freq * cnt - pres * (cnt > 0).float()
        if len(out) < min_tokens:
            x[eos] = float("-inf")
        t = int(x.argmax())
        out.append(t)
        ids.append(t)
        if t == eos:
            break
    return out


@pytest.mark.parametrize("draft", [None, "self:2"])
def test_penalties_greedy_match_plain_decoding(tiny_dir, engine, draft):
    d = tiny_dir("llama")
    llm = engine(draft)
    prompts = [[1, 5, 7, 9, 11, 5, 7], [1, 40, 41], [1, 60, 61, 62, 63, 64, 60]]
    sp = SamplingParams(max_tokens=12, repetition_penalty=1.4, presence_penalty=0.6, frequency_penalty=0.4,
                        min_tokens=6)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == _penalized_greedy(str(d), tuple(p), 12, 1.4, 0.6, 0.4, min_tokens=6)
    plain = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=12))
    assert [o.outputs[0].token_ids for o in outs] != [o.outputs[0].token_ids for o in plain]  # they bite
    # transformers' own repetition penalty is vLLM's (prompt and output tokens)
    rep = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=12, repetition_penalty=1.5,
                                                                                  ignore_eos=True))
    m = hf_model(str(d))
    for p, o in zip(prompts, rep):
        with torch.no_grad():
            g = m.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, repetition_penalty=1.5,
                           pad_token_id=0, eos_token_id=None)
        assert o.outputs[0].token_ids == g[0, len(p):].tolist()


def test_penalized_sampling_follows_penalized_target(tiny_dir):
    """Sampled with penalties and a draft that often disagrees: the second token follows the
    penalized target distribution given the first (chi-square)."""
    from scipy.stats import chisquare

    d = tiny_dir("llama")
    other = tiny_dir("llama", seed=1, num_hidden_layers=1, intermediate_size=48)
    tgt, draft = ResidentModel.from_source(Checkpoint(d)), ResidentModel.from_source(Checkpoint(other))
    prompt, N = [1, 5, 7, 9], 3000
    pen = dict(repetition_penalty=1.6, presence_penalty=1.0, frequency_penalty=0.5)
    reqs = [Request(i, prompt, SamplingParams(max_tokens=2, temperature=1.0, seed=50 + i, ignore_eos=True, **pen))
            for i in range(N)]
    stats = Generator(ReferenceBackend(tgt, draft), RunConfig(schedule="single", k=3, batch_size=N)).run(reqs)
    assert 0 < stats.accepted < stats.proposed
    first = np.array([r.out[0] for r in reqs])
    second = np.array([r.out[1] for r in reqs])
    t1 = int(np.bincount(first).argmax())
    m = hf_model(str(d))
    with torch.no_grad():
        x = m(torch.tensor([prompt + [t1]])).logits[0, -1].float()
    seen = torch.zeros_like(x, dtype=torch.bool)
    seen[prompt + [t1]] = True
    x = torch.where(seen, torch.where(x > 0, x / 1.6, x * 1.6), x)
    x[t1] -= 1.0 + 0.5
    p = torch.softmax(x, -1).numpy().astype(np.float64)
    sel = second[first == t1]
    assert len(sel) > 300
    counts = np.bincount(sel, minlength=len(p)).astype(float)
    big = p * len(sel) >= 5
    obs, exp = np.append(counts[big], counts[~big].sum()), np.append(p[big], p[~big].sum())
    exp = exp / exp.sum() * obs.sum()
    assert chisquare(obs, exp).pvalue > 1e-3
    # and the penalty moved the distribution: unpenalized, t1 would be far likelier again
    assert p[t1] < torch.softmax(m(torch.tensor([prompt + [t1]])).logits[0, -1].float(), -1)[t1].item() / 2


def test_generate_keywords_and_n(engine):
    llm = engine()
    a = llm.generate(["w5 w7"], sampling_params=SamplingParams(max_tokens=5))
    b = llm.generate(["w5 w7"], params=SamplingParams(max_tokens=5))  # the old keyword
    assert a[0].outputs[0].token_ids == b[0].outputs[0].token_ids
    assert isinstance(a[0].request_id, str) and a[0].request_id != b[0].request_id
    outs = llm.generate(["w5 w7", "w9"], [SamplingParams(max_tokens=3, n=2, temperature=1.0, seed=4),
                                          SamplingParams(max_tokens=4)])
    assert [len(o.outputs) for o in outs] == [2, 1] and len(outs[1].outputs[0].token_ids) <= 4
    with pytest.raises(ConfigError, match="sampling_params or params"):
        llm.generate(["x"], SamplingParams(), params=SamplingParams())
    with pytest.raises(ConfigError, match="no chat template"):
        llm.chat([{"role": "user", "content": "w5"}])


@pytest.mark.parametrize("kw,msg", [
    ({"best_of": 3}, "best_of=3 is not supported"), ({"use_beam_search": True}, "use_beam_search"),
    ({"guided_decoding": {"json": {}}}, "guided_decoding"), ({"prompt_logprobs": 1}, "prompt_logprobs"),
    ({"temprature": 0.5}, "unknown parameter 'temprature'"), ({"n": 0}, "n must be"),
    ({"stop": [""]}, "stop must be"), ({"min_tokens": 99, "max_tokens": 4}, "min_tokens")])
def test_unsupported_sampling_params_one_line(kw, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        SamplingParams(**kw)
    assert "\n" not in str(e.value)
    SamplingParams(best_of=1, use_beam_search=False, min_p=0.0, detokenize=True)  # vLLM's no-op values pass


def test_vllm_defaults():
    from specoffload.vllm import SamplingParams as VSP

    v, own = VSP(), SamplingParams()
    assert (v.temperature, v.max_tokens, v.top_p, v.top_k) == (1.0, 16, 1.0, -1)
    assert (own.temperature, own.max_tokens) == (0.0, 64)  # the engine's own: greedy (CLI and scripts)
    assert VSP(top_k=0).top_k == 0 and VSP(stop="x").stop == ("x",)
