"""Which layers stay resident: spread among the streamed ones, so the weight copy runs through
the pass (placement/resident_layers.py), checked against scripts/simulate_layer_order.py's
replay of the engine's slots and copy order."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from specoffload.placement.resident_layers import resident_layers

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "simulate_layer_order.py"


def _sim():
    spec = importlib.util.spec_from_file_location("simulate_layer_order", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("layers,n,disk", [(8, 3, 0), (8, 0, 0), (8, 8, 0), (32, 5, 0), (80, 12, 0), (32, 4, 6),
                                           (7, 6, 1)])
def test_n_distinct_layers_spread_evenly_and_none_read_from_disk(layers, n, disk):
    got = resident_layers(layers, n, disk)
    assert len(got) == len(set(got)) == n and list(got) == sorted(got)
    assert all(0 <= j < layers - disk for j in got)
    if n > 1:  # gaps between resident layers differ by at most one layer
        gaps = [b - a for a, b in zip(got, got[1:])]
        assert max(gaps) - min(gaps) <= 1


def test_w1_long_keeps_layers_1_4_6():
    assert resident_layers(8, 3) == (1, 4, 6)


def test_a_self_drafts_layers_come_first_and_the_rest_spread():
    assert resident_layers(32, 6, first=2) == (0, 1) + tuple(2 + int((i + 0.5) * 30 / 4) for i in range(4))
    assert resident_layers(8, 2, first=2) == (0, 1)
    assert resident_layers(8, 8, first=3) == tuple(range(8))


@pytest.mark.parametrize("layers,n,disk,first", [(8, 9, 0, 0), (8, 3, 6, 0), (8, -1, 0, 0), (8, 2, 0, 3),
                                                 (8, 4, 5, 2)])
def test_more_than_there_are_is_refused(layers, n, disk, first):
    with pytest.raises(ValueError, match="cannot keep"):
        resident_layers(layers, n, disk, first)


def test_spread_is_never_slower_than_first_and_faster_on_w1_long():
    """The replay: 2-4 slots, layers that compute faster than, near or slower than their copy,
    short and long drafting, and plain decoding."""
    sim = _sim()
    for layers in (8, 16):
        for n in range(1, layers):
            for slots in (2, 3, 4):
                for comp, copy, draft in ((35, 55, 45), (20, 55, 45), (50, 55, 45), (30, 20, 40), (22, 55, 0)):
                    first = sim.round_ms(range(n), layers, slots, comp, copy, draft, rounds=20)
                    spread = sim.round_ms(resident_layers(layers, n), layers, slots, comp, copy, draft, rounds=20)
                    assert spread <= first + 1e-9, (layers, n, slots, comp, copy, draft)
    # session 32's w1-long round (3 resident of 8 layers, 2 slots): the copy idles with the first 3
    first, spread = (sim.round_ms(r, 8, 2, 35, 55, 45) for r in (range(3), resident_layers(8, 3)))
    assert first == pytest.approx(385.0) and spread == pytest.approx(325.0)


def test_the_replay_prints_both_orders(capsys):
    assert _sim().main(["--layers", "4", "--slots", "2"]) == 0
    out = capsys.readouterr().out
    assert "| 2 | " in out and "[1, 3]" in out
    assert _sim().main(["--slots", "0"]) == 2


def test_the_planner_and_bench_spread_resident_layers():
    from specoffload.bench import _resident_layers
    from specoffload.placement.hardware import Hardware
    from specoffload.placement.planner import Workload, plan
    from specoffload.sources.constructed import mixtral_8x7b

    assert _resident_layers(8, 3) == (1, 4, 6)
    assert _resident_layers(8, 9) == tuple(range(9))  # Plan.check_layers refuses it in its own words
    hw = Hardware.from_file(Path(__file__).resolve().parents[1] / "configs" / "hardware" / "h200_traced.json")
    ch = plan(mixtral_8x7b(), None, hw, Workload(512, 128, 192, 0.8))  # plain W1 keeps some layers resident
    assert ch.best.resident > 1
    assert ch.plan.gpu_layers == resident_layers(32, ch.best.resident, ch.best.disk) != tuple(range(ch.best.resident))


def test_a_resident_layer_between_streamed_ones_gives_transformers_tokens(ray_session, tiny_dir):
    """The executor takes layer 1 from its resident set and layers 0 and 2 from the streamer
    (on a CPU, host views): the same greedy tokens as transformers."""
    from hf_reference import PROMPTS, hf_greedy
    from specoffload.configs.sampling_params import SamplingParams
    from specoffload.llm import LLM
    from specoffload.placement.plan import Plan

    d = tiny_dir("llama")
    with LLM(str(d), plan=Plan(device="cpu", gpu_layers=resident_layers(3, 1)), batch_size=4, progress=False,
             draft="self:1", k=3) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(max_tokens=12, ignore_eos=True))
    assert resident_layers(3, 1) == (1,)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(d, PROMPTS, 12)
