"""What `LLM.generate` and `LLM.chat` return, with vLLM's field names and meanings.

    RequestOutput(request_id="0", prompt, prompt_token_ids, prompt_logprobs=None,
                  outputs=[CompletionOutput(index, text, token_ids, cumulative_logprob,
                                            logprobs, finish_reason, stop_reason)], finished, metrics)

`logprobs` is None unless SamplingParams.logprobs was set; then one dict per generated token,
token id -> Logprob(logprob, rank, decoded_token), holding the chosen token and the top N of
the target's log-softmax (vLLM's default "raw" logprobs: before penalties and temperature).
`finish_reason` is "stop" (EOS, a stop token or a stop string) or "length"; `stop_reason` is
the stop string or stop token id that ended the output, None for EOS or length.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = the most likely token
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list
    cumulative_logprob: float | None = None
    logprobs: list | None = None
    finish_reason: str | None = None  # "stop" or "length"
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list
    outputs: list
    finished: bool = True
    metrics: dict = field(default_factory=dict)
    prompt_logprobs: None = None  # not computed (SamplingParams(prompt_logprobs=...) is refused)


def completion(index: int, r, tokenizer) -> CompletionOutput:
    """A finished scheduler Request as vLLM's CompletionOutput."""
    text = r.text if r.text is not None else tokenizer.decode(
        r.out, skip_special_tokens=r.params.skip_special_tokens)
    lps, cum = None, None
    if r.params.logprobs is not None and r.logprobs is not None:
        lps, cum = [], 0.0
        decoded = {}

        def dec(t):
            if t not in decoded:
                decoded[t] = tokenizer.decode([t])
            return decoded[t]

        for tok, (chosen, rank, ids, vals) in zip(r.out, r.logprobs):
            d = {tok: Logprob(chosen, rank, dec(tok))}  # the chosen token first, as vLLM orders it
            for i, (t, v) in enumerate(zip(ids, vals)):
                if t != tok:
                    d[t] = Logprob(v, i + 1, dec(t))
            lps.append(d)
            cum += chosen
    return CompletionOutput(index, text, list(r.out), cum, lps, r.finish_reason, r.stop_reason)
