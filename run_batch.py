"""`specoffload run-batch`: OpenAI Batch API files in, response lines out, as `vllm run-batch`.

Each input line is {"custom_id", "method": "POST", "url": "/v1/chat/completions" or
"/v1/completions", "body": {...}}; each output line, in input order, is
{"id", "custom_id", "response": {"status_code": 200, "request_id", "body": <chat.completion or
text_completion object with choices and usage>}, "error": null}. A line that cannot run
(bad JSON, unknown url, an unsupported field, a prompt too long) gets
{"response": {"status_code": 400, ...}, "error": "<why>"} for its custom_id; the rest run.
Body fields: messages / prompt, max_tokens (max_completion_tokens), temperature, top_p, top_k,
n, stop, seed, logprobs (chat: true + top_logprobs; completions: an int), presence_penalty,
frequency_penalty, repetition_penalty, min_tokens, stop_token_ids, ignore_eos,
include_stop_str_in_output. Defaults are the OpenAI API's (temperature 1, top_p 1; max_tokens
16 for completions), except a chat line without max_tokens gets --max-tokens (the API's "up to
the context" would reserve a whole context of KV cache per request).
"""

from __future__ import annotations

import json
import time
import uuid

from .configs.sampling_params import SamplingParams
from .errors import ConfigError, SpecOffloadError

URLS = ("/v1/chat/completions", "/v1/completions")
_PARAMS = {"temperature", "top_p", "top_k", "n", "stop", "seed", "presence_penalty", "frequency_penalty",
           "repetition_penalty", "min_tokens", "stop_token_ids", "ignore_eos", "include_stop_str_in_output"}
# Accepted at the value that changes nothing.
_NOOP = {"model": None, "user": None, "stream": (False,), "echo": (False,), "best_of": (None, 1),
         "logit_bias": (None, {}), "response_format": (None, {"type": "text"}), "tools": (None, []),
         "tool_choice": (None, "none"), "parallel_tool_calls": None, "store": None, "metadata": None}


class LineError(Exception):
    """One input line that cannot run: its custom_id and why (one line)."""

    def __init__(self, custom_id, msg: str):
        super().__init__(msg)
        self.custom_id = custom_id


def parse_line(line: str, n: int, tokenizer, default_max_tokens: int) -> dict:
    """An input line -> {custom_id, url, model, inputs (one per prompt), params, logprobs}."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise LineError(None, f"line {n}: not valid JSON ({e.msg})") from None
    if not isinstance(rec, dict):
        raise LineError(None, f"line {n}: not a JSON object")
    cid = rec.get("custom_id")
    try:
        return _parse(rec, tokenizer, default_max_tokens)
    except (SpecOffloadError, ValueError, TypeError, KeyError) as e:
        raise LineError(cid, f"line {n}: {e}") from None


def _parse(rec: dict, tokenizer, default_max_tokens: int) -> dict:
    from .chat import conversations, render

    if rec.get("method", "POST") != "POST":
        raise ConfigError(f"method must be POST, got {rec.get('method')!r}")
    url = rec.get("url")
    if url not in URLS:
        raise ConfigError(f"url must be one of {', '.join(URLS)}, got {url!r}")
    body = rec.get("body")
    if not isinstance(body, dict):
        raise ConfigError("'body' must be a JSON object")
    chat = url == URLS[0]
    prompt_key = "messages" if chat else "prompt"
    if prompt_key not in body:
        raise ConfigError(f"{url} needs body.{prompt_key}")
    for key, v in body.items():
        if key in _PARAMS or key in (prompt_key, "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs"):
            continue
        if key in _NOOP and (_NOOP[key] is None or v in _NOOP[key]):
            continue
        raise ConfigError(f"body.{key} is not supported" + (f" (value {v!r})" if key in _NOOP else ""))
    kw = {k: body[k] for k in _PARAMS if body.get(k) is not None}
    kw.setdefault("temperature", 1.0)  # the OpenAI API's default
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    kw["max_tokens"] = int(mt) if mt is not None else (default_max_tokens if chat else 16)
    lp = None
    if chat:
        if body.get("logprobs"):
            lp = int(body.get("top_logprobs") or 0)
        elif body.get("top_logprobs"):
            raise ConfigError("top_logprobs needs logprobs: true")
        inputs = [render(tokenizer, c) for c in conversations(body["messages"])]
        if len(inputs) != 1:
            raise ConfigError("body.messages must be one conversation")
    else:
        if body.get("logprobs") is not None:
            lp = int(body["logprobs"])
        p = body["prompt"]
        if isinstance(p, str):
            inputs = [p]
        elif isinstance(p, list) and p and all(isinstance(t, int) for t in p):
            inputs = [{"prompt_token_ids": p}]
        elif isinstance(p, list) and p and all(isinstance(t, str) for t in p):
            inputs = list(p)
        else:
            raise ConfigError("body.prompt must be a string, a list of strings or a list of token ids")
    if lp is not None:
        kw["logprobs"] = lp
    return {"custom_id": rec.get("custom_id"), "url": url, "model": body.get("model"), "inputs": inputs,
            "params": SamplingParams(**kw), "logprobs": lp}


def _top(d: dict, n: int) -> list:
    """The top n (token id, Logprob) of one position, by rank (the chosen token may be past n)."""
    return sorted(d.items(), key=lambda x: x[1].rank)[:n]


def _chat_logprobs(c, tokenizer, n: int) -> dict | None:
    if c.logprobs is None:
        return None

    def entry(t, lp):
        s = tokenizer.decode([t])
        return {"token": s, "logprob": lp.logprob, "bytes": list(s.encode())}

    return {"content": [entry(t, d[t]) | {"top_logprobs": [entry(i, lp) for i, lp in _top(d, n)]}
                        for t, d in zip(c.token_ids, c.logprobs)]}


def _completion_logprobs(c, tokenizer, n: int) -> dict | None:
    if c.logprobs is None:
        return None
    tokens, offsets, text = [], [], ""
    for t in c.token_ids:
        offsets.append(len(text))
        s = tokenizer.decode([t])
        tokens.append(s)
        text += s
    return {"tokens": tokens, "token_logprobs": [d[t].logprob for t, d in zip(c.token_ids, c.logprobs)],
            "top_logprobs": [{tokenizer.decode([i]): lp.logprob for i, lp in _top(d, n)} for d in c.logprobs],
            "text_offset": offsets}


def response_body(req: dict, outs: list, model_name: str, tokenizer) -> dict:
    """The chat.completion / text_completion object for one line's outputs (one per prompt)."""
    chat = req["url"] == URLS[0]
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for o in outs:
        prompt_tokens += len(o.prompt_token_ids)
        for c in o.outputs:
            completion_tokens += len(c.token_ids)
            ch = {"index": len(choices), "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
            if chat:
                ch |= {"message": {"role": "assistant", "content": c.text},
                       "logprobs": _chat_logprobs(c, tokenizer, req["logprobs"] or 0)}
            else:
                ch |= {"text": c.text, "logprobs": _completion_logprobs(c, tokenizer, req["logprobs"] or 0)}
            choices.append(ch)
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": req["model"] or model_name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def _line(custom_id, body=None, error=None) -> str:
    resp = {"status_code": 200 if error is None else 400, "request_id": f"specoffload-batch-{uuid.uuid4().hex}"}
    if body is not None:
        resp["body"] = body
    return json.dumps({"id": f"specoffload-{uuid.uuid4().hex}", "custom_id": custom_id, "response": resp,
                       "error": error})


def run_batch(llm, in_path: str, out_path: str, default_max_tokens: int = 256) -> tuple[int, int]:
    """Run every line of `in_path` on `llm`, write the response lines to `out_path` in input
    order; returns (lines that ran, lines that got an error)."""
    from pathlib import Path

    p = Path(in_path)
    if not p.is_file():
        raise ConfigError(f"batch input file not found: {p}")
    lines = [(n, s) for n, s in enumerate(p.read_text().splitlines(), 1) if s.strip()]
    if not lines:
        raise ConfigError(f"{p}: no requests")
    try:
        out_f = open(out_path, "w")
    except OSError as e:
        raise ConfigError(f"cannot write {out_path}: {e.strerror}") from None
    results: list[str | None] = [None] * len(lines)
    runnable = []  # (slot, parsed line)
    for slot, (n, s) in enumerate(lines):
        try:
            req = parse_line(s, n, llm.tokenizer, default_max_tokens)
            llm.check(req["inputs"], [req["params"]] * len(req["inputs"]))  # too long, bad ids: this line's error
            runnable.append((slot, req))
        except LineError as e:
            results[slot] = _line(e.custom_id, error=str(e))
        except SpecOffloadError as e:
            results[slot] = _line(req["custom_id"], error=f"line {n}: {e}")
    inputs, params, owner = [], [], []
    for slot, req in runnable:
        for x in req["inputs"]:
            inputs.append(x)
            params.append(req["params"])
            owner.append(slot)
    name = llm.model_dir.name
    with out_f:
        if inputs:
            outs = llm.generate(inputs, params)
            by_slot: dict[int, list] = {}
            for slot, o in zip(owner, outs):
                by_slot.setdefault(slot, []).append(o)
            for slot, req in runnable:
                results[slot] = _line(req["custom_id"], response_body(req, by_slot[slot], name, llm.tokenizer))
        out_f.write("".join(r + "\n" for r in results))
    return len(runnable), len(lines) - len(runnable)


def add_parser(sub, add_engine_options):
    r = sub.add_parser("run-batch", help="Run an OpenAI Batch API file (chat and completion lines), as vllm run-batch does.",
                       description="Read OpenAI Batch API request lines (/v1/chat/completions, /v1/completions) and "
                                   "write one response line per request, in input order; a line that cannot run "
                                   "gets an error line for its custom_id.")
    r.add_argument("-i", "--input-file", required=True, help="The requests: JSONL in the OpenAI Batch API format.")
    r.add_argument("-o", "--output-file", required=True, help="Where the response lines go (JSONL, one per request, in input order).")
    r.add_argument("--max-tokens", type=int, default=256,
                   help="The max_tokens of chat lines that set none (default 256; completion lines get 16, "
                        "the API's default).")
    r.add_argument("--quiet", action="store_true", help="Show no progress bar.")
    add_engine_options(r)
    return r


def main_args(args, llm_from_args) -> int:
    import sys

    from pathlib import Path

    if not Path(args.input_file).is_file():  # before the engine loads
        raise ConfigError(f"batch input file not found: {args.input_file}")
    # Lines are checked before the engine starts (LLM.start), so bad lines cost no weight load.
    llm = llm_from_args(args, progress=not args.quiet, start=False)
    try:
        ok, bad = run_batch(llm, args.input_file, args.output_file, args.max_tokens)
    finally:
        llm.shutdown()
    print(f"{ok} requests ran, {bad} got an error line; responses in {args.output_file}", file=sys.stderr)
    return 0
