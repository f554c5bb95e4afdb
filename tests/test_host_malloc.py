"""plan.keep_freed_memory (host_malloc.py): the CPU worker's process keeps the memory it frees,
so a layer's attention does not fault its temporaries in again page by page. Each check runs in
a fresh Python (the setting lasts a process's life): the CPU attention profile the GPU machine's
figures came from, at a smaller W4-shaped layer. The worker applying it and reporting it:
tests/test_doorbell.py::test_greedy_identical_with_doorbells."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

PROFILE = Path(__file__).resolve().parents[1] / "scripts" / "profile_cpu_attention.py"


def _profile(keep: bool) -> tuple[bool, float]:
    """(whether glibc took the setting, the engine path's minor faults a layer, mean over the
    passes after the warm-up) for 48 rows, 64/8 heads, 5 queries over 640 keys, 8 layers."""
    r = subprocess.run([sys.executable, str(PROFILE), "--heads", "64,8", "--batch", "48", "--queries", "5",
                        "--keys", "640", "--layers", "8", "--passes", "4", "--threads", "2",
                        *(["--keep-freed-memory"] if keep else [])], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    faults = re.search(r"^engine +\S+ ms per layer .*?, (\d+) minor faults per layer", r.stdout, re.M)
    assert faults, r.stdout
    return "glibc keeps freed memory: True" in r.stdout, float(faults.group(1))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and /proc's fault counts")
def test_a_worker_keeping_freed_memory_stops_refaulting_its_temporaries():
    """With the setting, a steady pass's attention takes (almost) no page faults. Without it the
    same layers fault their temporaries in again until glibc's dynamic mmap threshold has
    climbed past them, which may happen within the profile's warm-up or not: on the development
    machine 2,550-3,448 faults a layer in five runs, and 147 in a sixth (clean-clone CI, session
    45), against 0-34 with the setting; 4,057 against none at W4's 72 rows on the GPU machine.
    So the bound is on the kept side, and the default run checks that the profile reports the
    setting off when it is (its faults are not bounded either way)."""
    (kept_on, kept), (default_on, _) = _profile(True), _profile(False)
    assert kept_on is True and default_on is False
    assert kept < 128, kept  # under 512 KiB a layer: stray pages, not the temporaries


def test_the_plan_keeps_freed_memory_by_default():
    """On by default (tests/test_doorbell.py runs the actors with it on and off)."""
    from specoffload.placement.plan import Plan

    assert Plan().keep_freed_memory is True
    assert Plan(keep_freed_memory=False).keep_freed_memory is False
