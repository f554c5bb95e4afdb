"""Ray dashboard metrics of a run, recorded by the coordinator actor.

The metrics go through `ray.util.metrics`, so Ray's metrics agent exports them on each
node's Prometheus endpoint (`ray start --metrics-export-port=PORT`, or the port in
`ray.nodes()[i]["MetricsExportPort"]`) with the prefix `ray_`; counters get the suffix
`_total`. Every series carries the tag `run` (the engine's run id, as in the actor names
`specoffload-*-<run>`), so several engines on one cluster stay apart.

Cost: the generation loop calls `progress` once per batch per pass; it records at most
every `UPDATE_EVERY_S`. The stage timings come from the executor and the CPU worker
through `stats` calls submitted at most every `STATS_EVERY_S` and collected without
waiting (`ray.wait(timeout=0)`), so the loop never blocks on them. While a run goes, the
stage gauges cover the last interval (about 2 s); when it ends, the whole run. Metrics
never fail a run: the first error is logged and recording stops.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)

TAG_KEYS = ("run",)

# name -> (kind, description). Names as recorded; Prometheus shows "ray_" + name
# (+ "_total" for counters).
_STAGE = " (last ~2 s; the whole run once it ends)"
METRICS = {
    "specoffload_tokens_generated": (
        "counter", "Tokens generated (prefill's first tokens included)"),
    "specoffload_tokens_per_s": (
        "gauge", "Tokens generated per second since the current generate() call began"),
    "specoffload_acceptance_rate": (
        "gauge", "Fraction of proposed draft tokens the target accepted in the current run"),
    "specoffload_weight_stream_gbps": (
        "gauge", "Weight streaming host->GPU: GB copied per second of copy time" + _STAGE),
    "specoffload_cpu_attention_s_per_layer": (
        "gauge", "CPU attention seconds per layer per pass" + _STAGE),
    "specoffload_gpu_target_s_per_layer": (
        "gauge", "Executor target-model compute seconds per layer per pass" + _STAGE),
    "specoffload_gpu_busy_fraction": (
        "gauge", "Executor busy time (target + draft + prefill) over wall time" + _STAGE),
    "specoffload_draft_length": (
        "gauge", "Draft tokens per sequence the last verification pass checked (adaptive k's choice)"),
    "specoffload_rows_busy_fraction": (
        "gauge", "Share of the batch's rows at work per target pass (verified, or prefilled to join), "
                 "mean over the current run"),
    "specoffload_requests_queued": (
        "gauge", "Requests submitted to the engine and not finished yet"),
    "specoffload_requests_done": (
        "counter", "Requests finished"),
}

_registry: dict | None = None


def _metrics() -> dict:
    """The metric objects of this process (made once: one set per coordinator process)."""
    global _registry
    if _registry is None:
        from ray.util.metrics import Counter, Gauge

        kinds = {"counter": Counter, "gauge": Gauge}
        _registry = {name: kinds[kind](name, description=desc, tag_keys=TAG_KEYS)
                     for name, (kind, desc) in METRICS.items()}
    return _registry


def enabled_by_env() -> bool:
    return os.environ.get("SPECOFFLOAD_METRICS", "1").lower() not in ("0", "false", "no", "off")


def stage_rates(prev: dict, cur: dict, passes: int, num_layers: int) -> dict:
    """Gauges from two snapshots of the stage statistics (executor | CPU worker), taken
    `passes` target passes apart. Pure: the unit tests call it directly."""
    d = {k: cur.get(k, 0) - prev.get(k, 0) for k in
         ("target_s", "draft_s", "prefill_s", "weight_copy_s", "weight_bytes", "cpu_attention_s", "wall_s")}
    out = {}
    if d["wall_s"] > 0:
        busy = d["target_s"] + d["draft_s"] + d["prefill_s"]
        out["specoffload_gpu_busy_fraction"] = min(max(busy / d["wall_s"], 0.0), 1.0)
        out["specoffload_weight_stream_gbps"] = (d["weight_bytes"] / d["weight_copy_s"] / 1e9
                                                 if d["weight_copy_s"] > 0 else 0.0)
    if passes > 0 and num_layers > 0:
        out["specoffload_cpu_attention_s_per_layer"] = d["cpu_attention_s"] / (passes * num_layers)
        out["specoffload_gpu_target_s_per_layer"] = d["target_s"] / (passes * num_layers)
    return out


class RunMetrics:
    UPDATE_EVERY_S = 0.5
    STATS_EVERY_S = 2.0

    def __init__(self, run_id: str, num_layers: int, executor=None, attention=None,
                 enabled: bool | None = None):
        self.tags = {"run": str(run_id)}
        self.num_layers = num_layers
        self.ex, self.at = executor, attention
        self.on = enabled_by_env() if enabled is None else enabled
        self.m = None
        if self.on:
            self._guard(lambda: setattr(self, "m", _metrics()))
        self.queued = 0
        self._reset_run()

    # -- the run ------------------------------------------------------------------------
    def _reset_run(self):
        self.t0 = time.perf_counter()
        self._tokens = 0  # counted into the counter so far, this run
        self._passes = 0
        self._last_update = 0.0
        self._pending = None  # (refs, passes when submitted)
        self._last_submit = 0.0
        self._snap = None  # (passes, stats) the previous interval ended at
        self._base = None  # (passes, stats) at the start of the run

    def run_started(self, n_requests: int):
        self._reset_run()
        self.queued = n_requests  # one generate() at a time per coordinator

        def f():
            self._set("specoffload_requests_queued", self.queued)
            self._submit_stats(0)  # the baseline: runs before this run's work on each actor
        self._guard(f)

    def request_finished(self):
        self.queued = max(self.queued - 1, 0)

        def f():
            self.m["specoffload_requests_done"].inc(1, tags=self.tags)
            self._set("specoffload_requests_queued", self.queued)
        self._guard(f)

    def progress(self, stats: dict):
        """The generation loop's running statistics (RunStats.as_dict())."""
        now = time.perf_counter()
        if now - self._last_update < self.UPDATE_EVERY_S:
            return
        self._last_update = now
        self._guard(lambda: self._record(stats, now))

    def run_finished(self, stats: dict):
        """The final statistics of a run (RunStats.as_dict() | backend stats)."""
        def f():
            now = time.perf_counter()
            self._record(stats, now, collect=False)
            if stats.get("seconds"):
                self._set("specoffload_tokens_per_s", stats.get("tokens_per_s") or 0.0)
            if self._pending is not None:  # the run is over: these are answered
                import ray

                refs, passes = self._pending
                self._pending = None
                ex, at = ray.get(refs)
                self._snap = (passes, ex | at)
                self._base = self._base or self._snap
            # The final values cover the whole run: the last interval can be a sliver with no
            # work in it, which would leave e.g. a busy fraction of 0 on the dashboard.
            if "wall_s" in stats and self._base is not None:
                self._stage_update(self._base, (self._passes, stats))
        self._guard(f)

    # -- internals ----------------------------------------------------------------------
    def _record(self, stats: dict, now: float, collect: bool = True):
        tokens = int(stats.get("tokens", 0))
        if tokens > self._tokens:
            self.m["specoffload_tokens_generated"].inc(tokens - self._tokens, tags=self.tags)
            self._tokens = tokens
        self._passes = int(stats.get("passes", 0))
        self._set("specoffload_tokens_per_s", tokens / max(now - self.t0, 1e-9))
        if stats.get("acceptance") is not None:
            self._set("specoffload_acceptance_rate", stats["acceptance"])
        if stats.get("rows_busy") is not None:
            self._set("specoffload_rows_busy_fraction", stats["rows_busy"])
        if stats.get("k_last"):
            self._set("specoffload_draft_length", stats["k_last"])
        if collect:
            self._collect_stats(now)

    def _submit_stats(self, passes: int):
        if self.ex is None or self.at is None:
            return
        self._pending = ([self.ex.stats.remote(), self.at.stats.remote()], passes)
        self._last_submit = time.perf_counter()

    def _collect_stats(self, now: float):
        import ray

        if self._pending is not None:
            refs, passes = self._pending
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            if len(ready) < len(refs):
                return
            ex, at = ray.get(refs)
            self._pending = None
            cur = (passes, ex | at)
            if self._snap is not None:
                self._stage_update(self._snap, cur)
            self._snap = cur
            self._base = self._base or cur
        if now - self._last_submit >= self.STATS_EVERY_S:
            # Submitted after the pass just applied: its work precedes this call on each actor.
            self._submit_stats(self._passes)

    def _stage_update(self, prev, cur):
        for name, v in stage_rates(prev[1], cur[1], cur[0] - prev[0], self.num_layers).items():
            self._set(name, v)

    def _set(self, name: str, value: float):
        self.m[name].set(float(value), tags=self.tags)

    def _guard(self, fn):
        if not self.on:
            return
        try:
            fn()
        except Exception as e:  # never let the dashboard fail a run
            self.on = False
            log.warning("specoffload: metrics disabled after an error: %s", e)
