"""The plain path: target and draft whole in this process, nothing overlapped.

Kept beside the actor pipeline so the fast path can be tested against it; it is also what
`LLM(..., engine="reference")` runs.
"""

from __future__ import annotations

import time

import torch

from ..models.resident import ResidentModel
from ..placement.draft_kv import DraftKV
from ..speculation.runner import SpecRunner


class ReferenceBackend:
    def __init__(self, target: ResidentModel, draft: ResidentModel | None = None, kv: DraftKV | None = None, *,
                 draft_window=None, draft_kv_fp8: bool = False, draft_sinks: int = 0, draft_kv: str = "gpu"):
        """kv: the draft's KV cache (placement/draft_kv.py), or its fields as a Plan names them."""
        self.target = target
        self.spec = SpecRunner(draft, target.device, kv or DraftKV(draft_kv, draft_window, draft_sinks, draft_kv_fp8))
        self.caches = {}
        self._t_pass, self._t_draft = 1.0, 0.01

    def start(self, bid, prompts, samp, capacity, with_draft=False, joins=None):
        self.caches[bid] = (self.target.new_cache(len(prompts), capacity), prompts)
        self.spec.start(bid, samp, prompts if (with_draft and self.spec.draft) else None, capacity, joins)

    def join(self, bid, new, prompts, samp, capacity, with_draft, u_sample, ride=False):
        """Waiting requests that will take rows of batch bid: started and prefilled as batch
        `new`, merged by `merge` once their first tokens are out. Here at once whether or not
        the prefill rides the next pass (`ride`; nothing streams), so outputs can be compared."""
        self.start(new, prompts, samp, capacity, with_draft, joins=bid)
        return self.prefill(new, u_sample)

    def merge(self, bid, new):
        self.caches[bid][0].append(self.caches.pop(new)[0])
        self.spec.merge(bid, new)

    def prefill(self, bid, u_sample):
        cache, prompts = self.caches[bid]
        toks = torch.tensor([t for p in prompts for t in p])
        q_lens = torch.tensor([len(p) for p in prompts])
        logits = self.target.forward(cache, toks, q_lens, which="last")
        return self.spec.finish(bid, logits[:, None], 0, None, u_sample, first=True)

    def propose(self, bid, k, u_draft):
        t = time.perf_counter()
        self.spec.propose(bid, k, u_draft)
        self._t_draft = (time.perf_counter() - t) / max(k, 1)

    def verify(self, bid, k, u_accept, u_sample):
        t = time.perf_counter()
        cache = self.caches[bid][0]
        toks, q_lens = self.spec.target_inputs(bid, k)
        B = q_lens.shape[0]
        logits = self.target.forward(cache, toks, q_lens, which="all").view(B, k + 1, -1)
        res = self.spec.finish(bid, logits, k, u_accept, u_sample)  # (tokens, counts[, logprobs])
        cache.truncate(cache.lens - (k + 1) + torch.as_tensor(res[1], device=cache.lens.device))
        self._t_pass = time.perf_counter() - t
        return res

    def get(self, handle):
        return handle

    def timings(self):
        return self._t_pass, self._t_draft

    def gpu_rows(self, bid) -> int:
        """The plain path keeps every row's target KV in one cache (placement/gpu_kv_rows.py)."""
        return 0

    def keep(self, bid, idx):
        self.caches[bid][0].select(torch.as_tensor(idx, device=self.target.device))
        self.spec.keep(bid, idx)

    def free(self, bid):
        self.caches.pop(bid, None)
        self.spec.free(bid)

    def shutdown(self):
        self.caches.clear()
