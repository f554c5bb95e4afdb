"""The GPU check's pass rule for greedy speculative output against plain decoding (CI cannot run
the check itself; this rule decides its rows): equal, or first different where the two runs
swapped plain decoding's top two tokens by no more than their measured drift allows."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import gpu_check  # noqa: E402


def _ref(ids, gaps):
    """A plain run's records: at each position its token and a runner-up `gap` nats behind."""
    return {"token_ids": ids, "logprobs": [{str(t): -1.0, str(t + 1000): -1.0 - g} for t, g in zip(ids, gaps)]}


def _check(n):
    return gpu_check.Check(Path("/nonexistent"), Path("/nonexistent"), n, 4, 1)


def test_equal_output_passes():
    ok, note = _check(2).same({0: {"token_ids": [5, 6]}, 1: {"token_ids": [7]}},
                               {0: _ref([5, 6], [1, 1]), 1: _ref([7], [1])})
    assert ok and note == "2/2 equal to plain, drift 0.000 nats"


def test_a_first_difference_at_a_near_tie_taking_the_runner_up_passes():
    ok, note = _check(1).same({0: {"token_ids": [5, 1006, 9]}}, {0: _ref([5, 6, 7], [1, 0.01, 1])})
    assert ok and "1 first differ at a swap of plain's top 2 (gaps together <= 0.010" in note


def test_a_difference_where_plain_was_sure_fails():
    ok, note = _check(1).same({0: {"token_ids": [5, 1006]}}, {0: _ref([5, 6], [1, 0.5])})
    assert not ok and "the reference's top-2 gap 0.500" in note


def test_a_token_that_is_not_the_runner_up_fails_even_at_a_tie():
    ok, _ = _check(1).same({0: {"token_ids": [5, 42]}}, {0: _ref([5, 6], [1, 0.0])})
    assert not ok


def test_missing_or_short_outputs_fail():
    ref = {0: _ref([5, 6], [1, 1]), 1: _ref([7], [1])}
    assert not _check(2).same({0: {"token_ids": [5, 6]}}, ref)[0]  # one output missing
    assert not _check(2).same({0: {"token_ids": [5]}, 1: {"token_ids": [7]}}, ref)[0]  # cut short
    assert not _check(2).same({0: {"token_ids": [5, 6]}, 1: {"token_ids": [7]}}, {0: ref[0]})[0]  # no plain run


def _got(ids, lps):
    """A speculative run's records with its own log probabilities: lps[p] = {token: lp}."""
    return {"token_ids": ids, "logprobs": [{str(t): v for t, v in x.items()} for x in lps]}


def test_a_swap_within_twice_the_measured_drift_passes():
    # plain: 6 leads 1006 by 0.3 at token 1; the other run's log probabilities drift 0.2 where
    # they agree (token 0), and at token 1 it puts 1006 ahead by 0.05: gaps 0.35 <= 2 * 0.2
    ref = {0: _ref([5, 6], [1, 0.3])}
    got = _got([5, 1006], [{5: -1.2, 1005: -2.0}, {1006: -1.0, 6: -1.05}])
    ok, note = _check(1).same({0: got}, ref)
    assert ok and "drift 0.200" in note and "gaps together <= 0.350, allowed 0.400" in note


def test_a_swap_wider_than_the_drift_fails():
    ref = {0: _ref([5, 6], [1, 0.3])}
    got = _got([5, 1006], [{5: -1.01, 1005: -2.0}, {1006: -1.0, 6: -1.5}])  # drift 0.01; gaps 0.8
    ok, note = _check(1).same({0: got}, ref)
    assert not ok and "gaps 0.800 together, over 0.100" in note


def test_taking_the_runner_up_without_a_swap_fails():
    # the run took plain's runner-up, but plain's token is not its own runner-up: not a swap
    ref = {0: _ref([5, 6], [1, 0.01])}
    got = _got([5, 1006], [{5: -1.0, 1005: -2.0}, {1006: -1.0, 77: -1.001, 6: -3.0}])
    ok, note = _check(1).same({0: got}, ref)
    assert not ok and "no swap" in note


def test_drift_beyond_rounding_fails_the_run_even_where_tokens_agree():
    ref = {0: _ref([5, 6], [1, 1])}
    got = _got([5, 6], [{5: -1.0, 1005: -2.0}, {6: -2.5, 1006: -3.5}])  # equal tokens, 1.5 nats apart
    ok, note = _check(1).same({0: got}, ref)
    assert not ok and "drift 1.500" in note
