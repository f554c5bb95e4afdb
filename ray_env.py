"""Connecting to Ray: join the cluster the user points to, else start a local one.

The cluster joined is the one a plain `ray.init()` would join: `--ray-address` / `address`,
else `RAY_ADDRESS`, else the one the last `ray start` on this machine recorded (Ray's
`<temp dir>/ray_current_cluster`). Never `address="auto"`, which in Ray 2.60 also takes any
other Ray instance that happens to run on the machine (someone else's, running other code).
A joined cluster must run the same specoffload as this process (`check_cluster`).
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import threading
from pathlib import Path

from .errors import ConfigError

LOCAL = "local"  # --ray-address local / RAY_ADDRESS=local: always start a cluster of our own
RECORDED = "the last `ray start` on this machine (Ray's ray_current_cluster file)"
_checked: set = set()  # (cluster, node) pairs whose specoffload matched this process's


def cluster_address(address: str | None = None) -> tuple[str | None, str]:
    """(address to join or None to start a local cluster, where it came from), as `ray.init()`
    with no address decides (ray._private.services.get_ray_address_from_environment, without
    the legacy "auto" fallback to any running instance)."""
    if address:
        return (None if address == LOCAL else address), "--ray-address"
    env = os.environ.get("RAY_ADDRESS")
    if env:
        return (None if env == LOCAL else env), "RAY_ADDRESS"
    try:
        from ray._private.services import find_bootstrap_address
    except ImportError:  # pragma: no cover - a Ray without it: no recorded cluster
        return None, "local"
    recorded = find_bootstrap_address(None)
    if recorded:
        return recorded, RECORDED
    return None, "local"


def _unreachable(addr: str, timeout: float = 5.0) -> str | None:
    """Why nothing answers at a host:port cluster address, or None (also for other forms, such
    as ray:// client addresses, which Ray checks itself)."""
    import socket

    if "://" in addr:
        return None
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        return None
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as e:
        return f"nothing answers there ({e.strerror or e})"
    return None


def dashboard_wanted(dashboard: bool | None = None) -> bool:
    """Ray's dashboard on the local cluster we start: on unless `dashboard` is False or
    SPECOFFLOAD_DASHBOARD=0 (it costs a few seconds and ~200 MB; tests turn it off)."""
    if dashboard is not None:
        return dashboard
    return os.environ.get("SPECOFFLOAD_DASHBOARD", "1").strip().lower() not in ("0", "false", "no", "off")


def ensure_ray(address: str | None = None, dashboard: bool | None = None, object_store: int | None = None):
    """Join the cluster `cluster_address` names, else start a local one; a no-op when Ray is
    already initialised (the caller chose). A cluster that cannot be joined is a one-line
    ConfigError."""
    import ray

    if ray.is_initialized():
        return
    _connect(ray, address, dashboard, object_store)
    exit_on_sigterm()


def exit_on_sigterm():
    """SIGTERM (`timeout`, `kill`, a scheduler's stop) exits through SystemExit(143), so `with LLM`
    shuts the actors down, the run's /dev/shm goes and --out is closed on a whole line. Ray's
    Python side sets the same intent (sys.exit) before `ray.init`, but the driver's core worker
    then installs a C++ handler that prints a stack dump and aborts, skipping all of that."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_exit)


terminated = threading.Event()  # set by SIGTERM: Ray turns the SystemExit raised inside its waits into exit 1


def _raise_exit(signum, frame):
    terminated.set()
    raise SystemExit(128 + signum)


def _connect(ray, address, dashboard, object_store):
    env = dict(runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1"}})
    addr, source = cluster_address(address)
    if addr is not None:
        why = _unreachable(addr)
        if why:  # Ray itself retries a dead GCS address for minutes, printing a warning every 5 s
            raise ConfigError(f"cannot join the Ray cluster at {addr} (from {source}): {why}; start it, point "
                              f"RAY_ADDRESS or --ray-address elsewhere, or use --ray-address local")
        try:
            # The recorded cluster through ray.init's own default (address=None), which also
            # turns on token auth when a token exists and RAY_AUTH_MODE is unset; an explicit
            # address never does, in Ray as here.
            ray.init(address=None if source == RECORDED else addr, **env)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConfigError(f"cannot join the Ray cluster at {addr} (from {source}): "
                              f"{str(e).strip().splitlines()[0]}; start it, point RAY_ADDRESS or "
                              f"--ray-address elsewhere, or use --ray-address local") from None
        return
    _token_auth_by_default()
    dash = dashboard_wanted(dashboard) and _dashboard_installed(ray)
    # Logical CPUs cover every actor even on a 2-core machine (the actors' num_cpus are for
    # placement; torch threads are set per actor). address="local": a new cluster even if
    # one appeared since cluster_address looked.
    ray.init(address=LOCAL, num_cpus=max(os.cpu_count() or 1, 4), include_dashboard=dash,
             dashboard_host="127.0.0.1",
             object_store_memory=object_store or int(os.environ.get("SPECOFFLOAD_OBJECT_STORE", 2 * 2**30)),
             **env)


def _dashboard_installed(ray) -> bool:
    """A minimal Ray (`pip install ray`, not ray[default]) has no dashboard, and asking for one
    makes ray.init raise; run without it and say so in one line."""
    try:
        why = ray._private.utils.get_dashboard_dependency_error()
    except AttributeError:  # a Ray without the check: let ray.init decide
        return True
    if why:
        print(f"specoffload: Ray's dashboard needs ray[default] ({why}); starting Ray without it",
              file=sys.stderr)
    return not why


def _token_auth_by_default():
    """Ray 2.60 starts a new local cluster with token auth on when RAY_AUTH_MODE is unset, and
    says so in a warning on every run. We keep that default, chosen explicitly, so there is
    nothing to warn about: Ray makes the token (~/.ray/auth_token) if there is none, and
    `ray get-auth-token` prints it for the dashboard. RAY_AUTH_MODE=disabled opts out, as
    Ray's warning says. (Setting the variable alone is not enough: Ray caches its config.)"""
    if "RAY_AUTH_MODE" in os.environ:
        return
    try:
        from ray._private.authentication.authentication_token_setup import _enable_token_auth
    except ImportError:  # a Ray without token auth
        return
    _enable_token_auth()


# -- the same specoffload on the cluster ---------------------------------------------------------

def package_fingerprint() -> dict:
    """This installation of specoffload: version, folder, and a hash of its Python sources
    (the package folders only: those with an __init__.py)."""
    import specoffload

    root = Path(specoffload.__file__).resolve().parent
    h = hashlib.sha256()
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if (Path(d) / x / "__init__.py").is_file())
        for f in sorted(files):
            if f.endswith(".py"):
                p = Path(d) / f
                h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return {"version": specoffload.__version__, "path": str(root), "sha256": h.hexdigest()[:12]}


def _started_here() -> bool:
    """Whether this process started the Ray cluster it is connected to (its workers then run
    this interpreter and this sys.path)."""
    try:
        import ray._private.worker as w

        return bool(w._global_node is not None and w._global_node.head)
    except Exception:  # noqa: BLE001 - private API moved: check
        return False


def check_cluster(node_id: str | None = None, runtime_env: dict | None = None):
    """A one-line ConfigError unless the cluster's workers (on `node_id`, where the actors will
    run) import the same specoffload as this process: an actor built from other code would
    fail in ways that name neither version. Skipped for a cluster this process started; done
    once per cluster and node."""
    import ray

    if runtime_env is None and _started_here():
        return
    key = (ray.get_runtime_context().gcs_address, node_id)
    if runtime_env is None and key in _checked:
        return
    opts = {"num_cpus": 0, "max_retries": 0}
    if node_id:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=False)
    if runtime_env is not None:
        opts["runtime_env"] = runtime_env
    here = package_fingerprint()
    where = f"the Ray cluster at {key[0]}"
    try:
        there = ray.get(ray.remote(_remote_fingerprint()).options(**opts).remote(), timeout=300)
    except Exception as e:  # noqa: BLE001 - its workers cannot import specoffload at all
        last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{where} cannot run specoffload ({last}); install this specoffload "
                          f"({here['version']}, {here['path']}) there, or use --ray-address local") from None
    if (there["version"], there["sha256"]) != (here["version"], here["sha256"]):
        raise ConfigError(
            f"{where} runs another specoffload ({there['version']} from {there['path']}, source hash "
            f"{there['sha256']}) than this process ({here['version']} from {here['path']}, source hash "
            f"{here['sha256']}); join a cluster started from this installation, or use --ray-address local")
    if runtime_env is None:
        _checked.add(key)


def _remote_fingerprint():
    """The task that reports a worker's specoffload. A nested function, so Ray ships its code
    (by value) rather than a reference to this module, which the worker may not have."""

    def fingerprint() -> dict:
        import specoffload

        try:
            from specoffload.ray_env import package_fingerprint
        except ImportError:  # a specoffload from before this check
            return {"version": getattr(specoffload, "__version__", "?"), "path": specoffload.__file__, "sha256": "?"}
        return package_fingerprint()

    return fingerprint
