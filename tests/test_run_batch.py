"""`specoffload run-batch`: OpenAI Batch API lines in, vllm run-batch's response lines out;
a broken line gets an error line for its custom_id and the rest run."""

from __future__ import annotations

import json
import shutil

import numpy as np

from specoffload.cli import main
from specoffload.configs.sampling_params import SamplingParams
from specoffload.llm import LLM

TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}w3 {% endif %}")


def _model_with_chat_template(tiny_dir, tmp_path):
    from transformers import AutoTokenizer

    d = tmp_path / "model"
    shutil.copytree(tiny_dir("llama"), d)
    tok = AutoTokenizer.from_pretrained(str(d))
    tok.chat_template = TEMPLATE
    tok.save_pretrained(str(d))
    return d


def test_run_batch_chat_completion_and_broken_lines(tiny_dir, tmp_path, capsys):
    d = _model_with_chat_template(tiny_dir, tmp_path)
    chat = [{"role": "user", "content": "w30 w31 w32"}]
    lines = [
        {"custom_id": "chat-1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "tiny", "messages": chat, "max_tokens": 6, "temperature": 0,
                  "logprobs": True, "top_logprobs": 2}},
        {"custom_id": "cmpl-1", "method": "POST", "url": "/v1/completions",
         "body": {"model": "tiny", "prompt": "w40 w41 w42", "max_tokens": 7, "temperature": 0, "logprobs": 1}},
        '{"custom_id": "broken", "method": "POST", "url": "/v1/completions", "body": {"prompt": ',
        {"custom_id": "tools", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": chat, "tools": [{"type": "function"}]}},
        {"custom_id": "url", "method": "POST", "url": "/v1/embeddings", "body": {"input": "w5"}},
        {"custom_id": "long", "method": "POST", "url": "/v1/completions", "body": {"prompt": "w5", "max_tokens": 999}},
        {"custom_id": "cmpl-n", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": [1, 5, 7, 9], "n": 2, "temperature": 0.9, "seed": 3, "max_tokens": 5, "stop": ["w99"]}},
    ]
    inp, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    inp.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    rc = main(["run-batch", "-i", str(inp), "-o", str(out), "--model", str(d), "--engine", "reference", "--quiet"])
    assert rc == 0
    assert "3 requests ran, 4 got an error line" in capsys.readouterr().err
    res = [json.loads(s) for s in out.read_text().splitlines()]
    assert [r["custom_id"] for r in res] == ["chat-1", "cmpl-1", None, "tools", "url", "long", "cmpl-n"]
    ok = {r["custom_id"]: r for r in res if r["error"] is None}
    assert set(ok) == {"chat-1", "cmpl-1", "cmpl-n"}
    for r in res:
        assert r["id"] and r["response"]["request_id"]
        assert r["response"]["status_code"] == (200 if r["error"] is None else 400)
    errs = {r["custom_id"]: r["error"] for r in res if r["error"] is not None}
    assert "line 3: not valid JSON" in errs[None]
    assert "body.tools is not supported" in errs["tools"] and "/v1/embeddings" in errs["url"]
    assert "context" in errs["long"]  # 1 + 999 tokens > the tiny model's 256

    # The same tokens as LLM.chat / LLM.generate with the same settings.
    llm = LLM(str(d), engine="reference", progress=False)
    want_chat = llm.chat(chat, SamplingParams(max_tokens=6, logprobs=2))[0]
    body = ok["chat-1"]["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    (c,) = body["choices"]
    assert c["message"] == {"role": "assistant", "content": want_chat.outputs[0].text}
    assert c["finish_reason"] == want_chat.outputs[0].finish_reason
    assert body["usage"] == {"prompt_tokens": len(want_chat.prompt_token_ids),
                             "completion_tokens": len(want_chat.outputs[0].token_ids),
                             "total_tokens": len(want_chat.prompt_token_ids) + len(want_chat.outputs[0].token_ids)}
    lp = c["logprobs"]["content"]
    assert len(lp) == len(want_chat.outputs[0].token_ids) and all(len(e["top_logprobs"]) == 2 for e in lp)
    for e, t, d_ in zip(lp, want_chat.outputs[0].token_ids, want_chat.outputs[0].logprobs):
        assert abs(e["logprob"] - d_[t].logprob) < 1e-4  # batched differently: float rounding

    want = llm.generate(["w40 w41 w42"], SamplingParams(max_tokens=7, logprobs=1))[0].outputs[0]
    body = ok["cmpl-1"]["response"]["body"]
    assert body["object"] == "text_completion"
    (c,) = body["choices"]
    assert c["text"] == want.text and c["index"] == 0
    assert np.allclose(c["logprobs"]["token_logprobs"], [d_[t].logprob for t, d_ in zip(want.token_ids, want.logprobs)],
                       atol=1e-4)
    assert c["logprobs"]["tokens"] == [llm.tokenizer.decode([t]) for t in want.token_ids]
    assert all(len(x) == 1 for x in c["logprobs"]["top_logprobs"])

    body = ok["cmpl-n"]["response"]["body"]
    assert [ch["index"] for ch in body["choices"]] == [0, 1]
    assert body["usage"]["prompt_tokens"] == 4 and body["usage"]["completion_tokens"] <= 10
    singles = llm.generate([{"prompt_token_ids": [1, 5, 7, 9]}] * 2,
                           [SamplingParams(temperature=0.9, seed=s, max_tokens=5, stop=["w99"]) for s in (3, 4)])
    assert [ch["text"] for ch in body["choices"]] == [o.outputs[0].text for o in singles]


def test_run_batch_missing_file_is_one_line(tmp_path, capsys):
    rc = main(["run-batch", "-i", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "batch input file not found" in err
