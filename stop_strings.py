"""Stop strings, matched on the detokenized output as vLLM matches them.

After each generated token the output is decoded and searched for each stop string in the
part that could include the new characters, so a stop string split across tokens is found
on the token that completes it. The text ends before the stop string (or after it with
include_stop_str_in_output); token_ids keep every token up to the one that completed it.
Checks start once the output is longer than min_tokens, as in vLLM.
"""

from __future__ import annotations


def decoder(tokenizer, sp):
    """How stop strings see a request's output: its tokens as text (None: `sp` has no stop strings)."""
    if not sp.stop:
        return None
    skip = sp.skip_special_tokens
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip)


class StopStrings:
    def __init__(self, stops: tuple, include: bool, decode):
        self.stops, self.include, self.decode = stops, include, decode
        self.prev_len = 0  # characters of the output decoded before the newest token

    def check(self, out: list, active: bool) -> tuple[str, str] | None:
        """After a token was appended to `out`: (stop string, final text) if one now ends it."""
        text = self.decode(out)
        prev, self.prev_len = self.prev_len, len(text)
        if not active:
            return None
        hit = None
        for s in self.stops:
            # The match must take at least one of the new characters (else an earlier token ended it).
            i = text.find(s, max(0, prev - len(s) + 1))
            if i >= 0 and (hit is None or i < hit[0]):
                hit = (i, s)
        if hit is None:
            return None
        i, s = hit
        return s, text[: i + len(s) if self.include else i]
