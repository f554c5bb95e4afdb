"""The rules that judge greedy output against plain decoding where CI cannot run them: the GPU
check's rows (scripts/gpu_check.py: every token equal in fp32; in bf16 log probabilities that
move no more than rounding) and near_ties.judge, which the CUDA-only tests use (equal, or first
different where the two runs swapped plain decoding's top two within their measured drift)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from specoffload.near_ties import Sequence, judge, logprob_lists

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import gpu_check  # noqa: E402


def _ref(ids, gaps):
    """A plain run's records: at each position its token and a runner-up `gap` nats behind."""
    return {"token_ids": ids, "logprobs": [{str(t): -1.0, str(t + 1000): -1.0 - g} for t, g in zip(ids, gaps)]}


def _got(ids, lps):
    """Another run's records with its own log probabilities: lps[p] = {token: lp}."""
    return {"token_ids": ids, "logprobs": [{str(t): v for t, v in x.items()} for x in lps]}


def _seq(got, ref):
    return Sequence(got["token_ids"], ref["token_ids"], logprob_lists(got.get("logprobs")),
                    logprob_lists(ref.get("logprobs")))


def _check(n):
    return gpu_check.Check(Path("/nonexistent"), Path("/nonexistent"), n, 4, 1)


# -- the GPU check's rows ------------------------------------------------------------------------

def test_equal_output_passes_both_rules():
    got, ref = {0: {"token_ids": [5, 6]}, 1: {"token_ids": [7]}}, {0: _ref([5, 6], [1, 1]), 1: _ref([7], [1])}
    for exact in (True, False):
        ok, note = _check(2).same(got, ref, exact)
        assert ok and note == "2/2 equal to plain, drift 90th percentile 0.000 and max 0.000 nats"


def test_fp32_rows_need_every_token_equal_even_at_a_tie():
    ok, note = _check(1).same({0: {"token_ids": [5, 1006]}}, {0: _ref([5, 6], [1, 0.0])}, exact=True)
    assert not ok and "0/1 equal" in note


def test_bf16_rows_pass_differences_whose_log_probabilities_stay_within_rounding():
    got = _got([5, 1006, 9], [{5: -1.03, 1005: -2.0}, {1006: -1.0, 6: -1.1}, {9: -1.0, 1009: -3.0}])
    ok, note = _check(1).same({0: got}, {0: _ref([5, 6, 7], [1, 0.05, 1])})
    # a swap wider than the allowance (0.15 > 0.1): counted apart in the note, but rounding-sized drift
    assert ok and note.startswith("0/1 equal to plain, drift 90th percentile 0.030 and max 0.030 nats, 1 otherwise "
                                  "(sequence 0 differs at token 1")


def test_bf16_rows_fail_where_log_probabilities_move_beyond_rounding():
    got = _got([5, 6], [{5: -1.0, 1005: -2.0}, {6: -2.5, 1006: -3.5}])  # equal tokens, 1.5 nats apart
    ok, note = _check(1).same({0: got}, {0: _ref([5, 6], [1, 1])})
    assert not ok and "1/1 equal to plain, drift 90th percentile 1.500 and max 1.500 nats" in note


def _drifting(n, moves):
    """A run of n positions equal to a plain run's, position p's log probabilities moved by moves[p]."""
    ids = list(range(5, 5 + n))
    return _got(ids, [{t: -1.0 - m, t + 1000: -2.0 - m} for t, m in zip(ids, moves)]), _ref(ids, [1.0] * n)


def test_bf16_rows_pass_a_rare_spike_where_a_router_flipped():
    got, ref = _drifting(20, [0.03] * 19 + [0.7])  # one position in 20 moved 0.7 nats, the rest a bf16 step
    ok, note = _check(1).same({0: got}, {0: ref})
    assert ok and "90th percentile 0.030 and max 0.700" in note


def test_bf16_rows_fail_where_most_positions_move_beyond_rounding():
    got, ref = _drifting(20, [0.03] * 17 + [0.3] * 3)  # 3 in 20 moved: more than rare
    ok, note = _check(1).same({0: got}, {0: ref})
    assert not ok and "90th percentile 0.300" in note


def test_missing_or_short_outputs_fail():
    ref = {0: _ref([5, 6], [1, 1]), 1: _ref([7], [1])}
    for exact in (True, False):
        assert not _check(2).same({0: {"token_ids": [5, 6]}}, ref, exact)[0]  # one output missing
        assert not _check(2).same({0: {"token_ids": [5, 6]}, 1: {"token_ids": [7]}}, {0: ref[0]}, exact)[0]  # no plain run
    assert not _check(2).same({0: {"token_ids": [5]}, 1: {"token_ids": [7]}}, ref, True)[0]  # cut short


# -- near_ties.judge (the CUDA-only tests) -----------------------------------------------------------

def test_a_tie_taking_the_runner_up_agrees_when_only_plains_gap_is_known():
    v = judge([_seq({"token_ids": [5, 1006, 9]}, _ref([5, 6, 7], [1, 0.01, 1]))])
    assert v.ok and v.ties[0][:2] == (0, 1) and abs(v.ties[0][2] - 0.01) < 1e-9


def test_a_difference_where_plain_was_sure_does_not_agree():
    v = judge([_seq({"token_ids": [5, 1006]}, _ref([5, 6], [1, 0.5]))])
    assert v.bad == ["sequence 0 differs at token 1: 1006 for 6, the reference's top-2 gap 0.500"]


def test_a_token_that_is_not_the_runner_up_never_agrees():
    v = judge([_seq({"token_ids": [5, 42]}, _ref([5, 6], [1, 0.0]))])
    assert not v.ok and "not the reference's runner-up" in v.bad[0]


def test_a_swap_within_twice_the_measured_drift_agrees():
    # plain: 6 leads 1006 by 0.3 at token 1; the other run's log probabilities drift 0.2 where
    # they agree (token 0), and at token 1 it puts 1006 ahead by 0.05: gaps 0.35 <= 2 * 0.2
    got = _got([5, 1006], [{5: -1.2, 1005: -2.0}, {1006: -1.0, 6: -1.05}])
    v = judge([_seq(got, _ref([5, 6], [1, 0.3]))])
    assert v.ok and abs(v.drift - 0.2) < 1e-9 and abs(v.allowance - 0.4) < 1e-9 and abs(v.ties[0][2] - 0.35) < 1e-9


def test_a_swap_wider_than_the_drift_does_not_agree():
    got = _got([5, 1006], [{5: -1.01, 1005: -2.0}, {1006: -1.0, 6: -1.5}])  # drift 0.01; gaps 0.8
    v = judge([_seq(got, _ref([5, 6], [1, 0.3]))])
    assert v.bad == ["sequence 0 differs at token 1: 1006 for 6, gaps 0.800 together, over 0.100"]


def test_taking_the_runner_up_without_a_swap_does_not_agree():
    # the run took plain's runner-up, but plain's token is not its own runner-up
    got = _got([5, 1006], [{5: -1.0, 1005: -2.0}, {1006: -1.0, 77: -1.001, 6: -3.0}])
    v = judge([_seq(got, _ref([5, 6], [1, 0.01]))])
    assert not v.ok and "no swap" in v.bad[0]


def test_drift_beyond_rounding_fails_even_where_tokens_agree():
    got = _got([5, 6], [{5: -1.0, 1005: -2.0}, {6: -2.5, 1006: -3.5}])
    v = judge([_seq(got, _ref([5, 6], [1, 1]))])
    assert v.equal == 1 and not v.ok and "drift 1.500" in v.bad[0]


def _outputs(ids, lps):
    """A RequestOutput-like object: token ids and, per token, {token: object with .logprob}."""
    from types import SimpleNamespace as NS

    return NS(outputs=[NS(token_ids=ids, logprobs=[{t: NS(logprob=v) for t, v in x.items()} for x in lps])])


def test_the_moe_router_rule_lets_a_wide_swap_pass_but_not_another_token():
    """The CUDA fp8-target test's rule for a bf16 MoE (tests/hf_reference.py): a swap of plain's
    top two passes beyond the drift's allowance, a token that is not plain's runner-up fails, and
    so does drift that is not rounding-sized."""
    from hf_reference import differ_beyond_near_ties  # tests/ is on the path (conftest.py)

    plain = _outputs([5, 6], [{5: -1.0, 1005: -2.0}, {6: -1.0, 1006: -1.1}])
    swap = _outputs([5, 1006], [{5: -1.0, 1005: -2.0}, {1006: -1.0, 6: -1.08}])  # gaps 0.18 together
    other = _outputs([5, 42], [{5: -1.0, 1005: -2.0}, {42: -1.0, 6: -1.08}])
    drift = _outputs([5, 1006], [{5: -1.3, 1005: -2.0}, {1006: -1.0, 6: -1.08}])  # moved 0.3 where equal
    assert "gaps 0.180 together, over 0.100" in differ_beyond_near_ties([swap], [plain])[0]
    assert differ_beyond_near_ties([swap], [plain], moe_router=True) == []
    assert "not the reference's runner-up" in differ_beyond_near_ties([other], [plain], moe_router=True)[0]
    assert "90th percentile 0.300" in differ_beyond_near_ties([drift], [plain], moe_router=True)[0]


# -- --time-limit ------------------------------------------------------------------------------

def test_past_the_time_limit_a_step_is_skipped_and_its_row_says_so(tmp_path):
    c = gpu_check.Check(tmp_path, tmp_path, 1, 4, 1, time_limit=1e-3)
    time.sleep(0.01)
    rc, _, _ = c.run("a step", [sys.executable, "-c", "open('ran', 'w')"])
    c.row("a step", True, 0, "would pass")
    assert rc == 125 and not (gpu_check.REPO / "ran").exists()
    assert [r[:4] for r in c.rows] == [("a step", False, 0, "skipped: past --time-limit")]
    assert c.run("ray stop", [sys.executable, "-c", "pass"], always=True)[0] == 0  # the cleanup still runs


def test_a_skipped_step_marks_only_its_own_threads_row(tmp_path):
    """Steps run side by side in threads: a step skipped in one thread leaves another's row be."""
    import threading

    c = gpu_check.Check(tmp_path, tmp_path, 1, 4, 1, time_limit=600)
    ran, late = threading.Event(), threading.Event()

    def other():
        c.run("runs", [sys.executable, "-c", "pass"])
        ran.set()
        late.wait(10)  # the row comes after the other thread's step was skipped
        c.row("runs", True, 0, "passed")

    t = threading.Thread(target=other)
    t.start()
    assert ran.wait(30)
    c.deadline = time.perf_counter()  # from now on nothing starts
    assert c.run("late", [sys.executable, "-c", "pass"])[0] == 125 and c.skipped
    late.set()
    t.join()
    assert [r[:2] for r in c.rows] == [("runs", True)]


def test_a_step_still_running_at_the_time_limit_says_it_was_stopped_there(tmp_path):
    """Killed at the limit, not at its own timeout, a step's row says so (session 37's check on a
    slow host: rows cut at --time-limit read as failures with rc 124 and nothing more)."""
    c = gpu_check.Check(tmp_path, tmp_path, 1, 4, 1, time_limit=17)
    rc, text, dt = c.run("slow", [sys.executable, "-c", "import time; time.sleep(60)"], timeout=300)
    c.row("slow", True, dt, "0/16 outputs")
    assert rc == 124 and c.cut and "(--time-limit)" in text
    assert c.rows[0][1] is False and c.rows[0][3].startswith("stopped at --time-limit after ")
    assert c.rows[0][3].endswith("; 0/16 outputs")
    c.deadline = None  # its own timeout: a failure like any other
    rc, _, dt = c.run("own", [sys.executable, "-c", "import time; time.sleep(60)"], timeout=1)
    c.row("own", False, dt, "rc 124")
    assert rc == 124 and not c.cut and c.rows[1][3] == "rc 124"


def test_within_the_time_limit_a_step_runs(tmp_path):
    c = gpu_check.Check(tmp_path, tmp_path, 1, 4, 1, time_limit=600)
    rc, text, _ = c.run("a step", [sys.executable, "-c", "print('hello')"])
    assert rc == 0 and text == "hello\n" and not c.skipped


# -- the pool of engine rows ---------------------------------------------------------------------

def _pool_run(jobs, more_after=None, n=6, hold=0.2):
    """n rows that each hold a worker for `hold` s; `more` set by row `more_after` as it starts.
    (start order, most rows running at once)."""
    import threading

    c = gpu_check.Check(Path("/nonexistent"), Path("/nonexistent"), 1, 4, 1, jobs=jobs)
    more, lock, started, running, peak = threading.Event(), threading.Lock(), [], [0], [0]

    def row(i):
        with lock:
            started.append(i)
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        if i == more_after:
            more.set()
        time.sleep(hold)
        with lock:
            running[0] -= 1

    c.pool([lambda i=i: row(i) for i in range(n)], more, lambda f: f())
    return started, peak[0]


def test_the_pool_starts_rows_in_order_jobs_at_a_time():
    started, peak = _pool_run(2)
    assert sorted(started[:2]) == [0, 1] and sorted(started) == list(range(6)) and peak == 2


def test_the_pool_takes_one_more_row_at_a_time_once_told():
    assert _pool_run(2, more_after=0)[1] == 3


def test_a_row_compared_with_another_waits_for_its_outputs():
    import threading

    ref, seen = gpu_check.Outputs(), []
    t = threading.Thread(target=lambda: seen.append(ref.get()))
    t.start()
    time.sleep(0.05)
    assert not seen  # still running: nothing to compare with yet
    try:
        with ref.setting():
            ref.value = {0: {"token_ids": [1]}}
            raise RuntimeError("the row failed after writing its outputs")
    except RuntimeError:
        pass
    t.join(5)
    assert seen == [{0: {"token_ids": [1]}}]  # however the row ended, the waiter goes on
