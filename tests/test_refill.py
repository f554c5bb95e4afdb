"""Batches that refill: requests beyond the batch size start as new batches whose target
passes are shared with the running ones. Output stays each request's greedy output."""

from __future__ import annotations

import pytest

from hf_reference import PROMPTS, hf_greedy
from specoffload.actors.pass_layers import PassLayers
from specoffload.configs.run_config import RunConfig
from specoffload.configs.sampling_params import SamplingParams
from specoffload.llm import LLM
from specoffload.models.checkpoint import Checkpoint
from specoffload.models.resident import ResidentModel
from specoffload.scheduler.generator import Generator
from specoffload.scheduler.reference_backend import ReferenceBackend
from specoffload.scheduler.request import Request

# Seven requests of different lengths: rows finish at different passes.
LENGTHS = [24, 5, 9, 17, 3, 12, 20]
REQS = [(PROMPTS[i % len(PROMPTS)], n) for i, n in enumerate(LENGTHS)]


def _want(d):
    full = {tuple(p): o for p, o in zip(PROMPTS, hf_greedy(d, PROMPTS, max(LENGTHS)))}
    return [full[tuple(p)][:n] for p, n in REQS]


@pytest.mark.parametrize("schedule,draft", [("none", None), ("single", "self"), ("single", "window")])
def test_refilled_batches_keep_greedy_output(tiny_dir, schedule, draft):
    d = tiny_dir("llama")
    tgt = ResidentModel.from_source(Checkpoint(d))
    dr = None if draft is None else ResidentModel(tgt.spec.with_layers(1), tgt.glob, tgt.layers[:1])
    backend = ReferenceBackend(tgt, dr, draft_window=4 if draft == "window" else None)
    runs = {}
    for refill in (True, False):
        reqs = [Request(i, p, SamplingParams(max_tokens=n, ignore_eos=True)) for i, (p, n) in enumerate(REQS)]
        cfg = RunConfig(schedule=schedule, k=3, batch_size=3, refill=refill, refill_rows=1)
        runs[refill] = (Generator(backend, cfg).run(reqs), [r.out for r in reqs])
    assert runs[True][1] == runs[False][1] == _want(d)
    (on, _), (off, _) = runs[True], runs[False]
    assert off.batches == 3 and on.batches > 3  # waves of 3, or a new batch whenever a row frees
    assert on.passes < off.passes  # no pass serves only a wave's last rows while requests wait


def test_refill_through_actors_shares_passes(ray_session, tiny_dir):
    """On the actors a pass verifies every running batch with one stream of the weights."""
    d = tiny_dir("llama")
    with LLM(str(d), draft="self:1", batch_size=3, k=3, progress=False, micro_batches=2, refill=True) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p, _ in REQS],
                            [SamplingParams(max_tokens=n, ignore_eos=True) for _, n in REQS])
        stats = llm.last_stats
    assert [o.outputs[0].token_ids for o in outs] == _want(d)
    assert stats["batches"] > 3


def test_a_layer_is_released_after_the_last_part_of_the_pass():
    pl = PassLayers()
    pl.begin(3)  # e.g. batch A in two micro-batches and batch B in one
    assert [pl.finished(0), pl.finished(0), pl.finished(1), pl.finished(0)] == [False, False, False, True]
    assert [pl.finished(1), pl.finished(1)] == [False, True]
    pl.begin(1)
    assert pl.finished(0)
    with pytest.raises(ValueError):
        pl.begin(0)
    pl.begin(2)
    pl.finished(0)  # a pass that failed after one part of layer 0...
    pl.begin(2)  # ...does not leave its count to the next pass
    assert [pl.finished(0), pl.finished(0)] == [False, True]
