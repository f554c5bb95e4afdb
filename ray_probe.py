"""A Ray address that does not answer is one line, before `ray.init` waits on it.

`ray.init(address=...)` on a host:port where nothing listens retries for a long while and then
raises from deep inside Ray. A TCP connect with a short timeout says the same in a second.
"""

from __future__ import annotations

import os
import socket

from .errors import ConfigError


def check_ray_address(address: str | None = None, timeout: float = 3.0):
    addr = address or os.environ.get("RAY_ADDRESS")
    if not addr or addr in ("auto", "local"):
        return
    hostport = addr.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"Ray address {addr!r} is not host:port (e.g. 10.0.0.1:6379 or ray://host:10001)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise ConfigError(f"Ray address {addr} does not answer ({why}); start the cluster there "
                          f"(ray start --head) or fix --ray-address / RAY_ADDRESS") from None
