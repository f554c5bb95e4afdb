"""Load, CI form: 200 requests of mixed lengths (one token, the whole context, EOS stops) through
the actor pipeline; every output present and well formed, a sample equal to the reference
engine, driver and actor RSS flat over the run. `scripts/load_test.py --requests 2000` is the
full form (docs/reliability.md)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def _load_test():
    spec = importlib.util.spec_from_file_location("load_test", Path(__file__).parents[1] / "scripts" / "load_test.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_200_mixed_requests_through_the_actors(ray_session, tiny_dir):
    lt = _load_test()
    r = lt.run(tiny_dir("llama"), 200, sample=20, batch_size=100)  # two waves: CI time
    print(lt.table(r))
    assert r["problems"] == []
    assert r["one_token"] >= 40 and r["at_context"] >= 40 and r["requests"] == 200
