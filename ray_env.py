"""Connecting to Ray: join a running cluster if there is one, else start a local one."""

from __future__ import annotations

import os


def ensure_ray(address: str | None = None, num_cpus: int | None = None):
    import ray

    if ray.is_initialized():
        return
    env = dict(runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1"}})
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or os.environ["RAY_ADDRESS"], **env)
        return
    try:
        ray.init(address="auto", **env)  # a cluster started with `ray start` on this machine
        return
    except ConnectionError:
        pass
    # A local cluster: logical CPUs cover every actor even on a 2-core machine (the actors'
    # num_cpus are for placement; torch threads are set per actor).
    ray.init(num_cpus=max(os.cpu_count() or 1, 4), include_dashboard=False,
             object_store_memory=int(os.environ.get("SPECOFFLOAD_OBJECT_STORE", 2 * 2**30)), **env)
