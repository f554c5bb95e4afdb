"""What failed Ray actor calls cost when they re-raise one stored error: N prefill-shaped call
pairs (an executor call whose result feeds a worker call, as `ActorBackend._prefill_calls`
queues them) when every executor call from the fourth on raises the same exception object,
against the same N when none does. Each raise lengthens that object's traceback, so each
failed call costs more than the last (with a fresh exception per call they cost ~nothing).

    python scripts/ray_failed_calls.py --calls 960

Why the executor's prefill calls return None after a failure instead of raising
(actors/gpu_executor.py, `prefill_layer`). Prints the seconds until every worker call settled,
for both cases, and their ratio.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=960, help="call pairs (W4's prefill: 80 layers x 12 sub-batches)")
    a = ap.parse_args(argv)
    if a.calls < 4:
        print("ray_failed_calls: error: --calls must be >= 4", file=sys.stderr)
        return 2
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    @ray.remote
    class Executor:
        """Raises one stored error object again on every call after the first failure, as
        the executor's prefill did (each raise lengthens that object's traceback)."""

        def __init__(self):
            self.error = None

        def layer(self, j: int, fail: bool):
            if fail and j >= 3:
                if self.error is None:
                    self.error = RuntimeError("prefill ran out of GPU memory at layer 3")
                raise self.error
            return b"k" * 1024

    @ray.remote
    class Worker:
        def store(self, kv):
            return None

    ex, wk = Executor.remote(), Worker.remote()
    seconds = {}
    for fail in (False, True):
        t = time.perf_counter()
        stores = [wk.store.remote(ex.layer.remote(j, fail)) for j in range(a.calls)]
        ray.wait(stores, num_returns=len(stores), timeout=600)
        seconds[fail] = time.perf_counter() - t
    ray.shutdown()
    print(f"{a.calls} call pairs: {seconds[False]:.2f} s when none fails, {seconds[True]:.2f} s when all but "
          f"3 fail ({seconds[True] / seconds[False]:.0f}x, {1e3 * (seconds[True] - seconds[False]) / (a.calls - 3):.0f} "
          f"ms per failed pair)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
