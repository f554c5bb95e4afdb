"""The GPU check's pass rule for greedy speculative output against plain decoding (CI cannot run
the check itself; this rule decides its rows): equal, or first different at one of plain
decoding's own near-ties, taking the other of its top two there."""

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
    assert ok and note == "2/2 equal to plain"


def test_a_first_difference_at_a_near_tie_taking_the_runner_up_passes():
    ok, note = _check(1).same({0: {"token_ids": [5, 1006, 9]}}, {0: _ref([5, 6, 7], [1, 0.01, 1])})
    assert ok and "1 first differ at a near-tie" in note and "0.010" in note


def test_a_difference_where_plain_was_sure_fails():
    ok, note = _check(1).same({0: {"token_ids": [5, 1006]}}, {0: _ref([5, 6], [1, 0.5])})
    assert not ok and "1 differ elsewhere (first: 0)" in note


def test_a_token_that_is_not_the_runner_up_fails_even_at_a_tie():
    ok, _ = _check(1).same({0: {"token_ids": [5, 42]}}, {0: _ref([5, 6], [1, 0.0])})
    assert not ok


def test_missing_or_short_outputs_fail():
    ref = {0: _ref([5, 6], [1, 1]), 1: _ref([7], [1])}
    assert not _check(2).same({0: {"token_ids": [5, 6]}}, ref)[0]  # one output missing
    assert not _check(2).same({0: {"token_ids": [5]}, 1: {"token_ids": [7]}}, ref)[0]  # cut short
    assert not _check(2).same({0: {"token_ids": [5, 6]}, 1: {"token_ids": [7]}}, {0: ref[0]})[0]  # no plain run
