"""bench records what the host was doing when it started (host_facts): a process that keeps a
core busy is named, with its share, and the CPUs' busy share counts it."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from specoffload import host_facts

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc")


def test_a_busy_process_is_named_with_its_share_of_a_core():
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # past the interpreter's start
        facts = host_facts.snapshot(window_s=0.6)
    finally:
        spin.kill()
        spin.wait()
    mine = [p for p in facts["busy_processes"] if p["pid"] == spin.pid]
    assert mine and 0.5 <= mine[0]["cores"] <= 1.2, facts
    assert facts["busy"] >= 0.5 / facts["cores"] * 0.8, facts  # one core of `cores`, less scheduler noise
    line = host_facts.describe(facts)
    assert line.startswith("host: ") and f"pid {spin.pid}" in line and "\n" not in line
    assert facts["cpu"]  # /proc/cpuinfo names the model on Linux
    assert facts["mem_available_gib"] > 0 and "GiB memory available" in line
    if facts["thp"]:  # a kernel built with transparent huge pages
        assert facts["thp"]["enabled"] in ("always", "madvise", "never") and "transparent huge pages" in line


def test_a_busy_host_is_warned_about_and_a_quiet_one_not():
    quiet = {"cpu": "x", "cores": 16, "loadavg": [0.1, 0.1, 0.1], "busy": 0.02, "busy_processes": []}
    assert host_facts.warning(quiet) is None
    busy = dict(quiet, busy=0.31)
    assert "31% of the CPUs were busy" in host_facts.warning(busy)


def test_vmstat_counters_grow_and_their_growth_is_what_a_run_reports():
    """bench's "host memory during the run": /proc/vmstat's reclaim and huge page counters,
    the same names in two samples, and each one's growth between them (never negative here)."""
    from specoffload import memory_facts

    first = memory_facts.vm_counters()
    assert first and set(first) <= set(memory_facts.VM_COUNTERS) and "pgscan_kswapd" in first
    junk = bytearray(64 << 20)  # some faults meanwhile; the counters are the machine's, so only >= 0
    del junk
    grew = memory_facts.vm_between(first, memory_facts.vm_counters())
    assert set(grew) == set(first) and all(v >= 0 for v in grew.values())
    assert memory_facts.vm_between(first, {"pgscan_kswapd": first["pgscan_kswapd"] + 3})["pgscan_kswapd"] == 3
    assert memory_facts.vm_between(None, first) is None
