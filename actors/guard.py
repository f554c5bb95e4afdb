"""Errors raised inside the actors: one line for the user, the traceback in the run's log file.

Ray prints an actor constructor's exception, traceback and all, on the worker's stderr and
streams it to the driver (a truncated checkpoint gave the right one-line error under ~90
lines of actor tracebacks); a method's exception it only hands to the caller. So the engine's
actors are built from `guarded(cls, role, run_id)`: a constructor's error is kept and raised
by the first method called instead, and every error's traceback is appended to
`log_path(run_id)` before it goes on to the caller. The driver turns what reaches it into
one line that names that file (`user_error`).
"""

from __future__ import annotations

import functools
import inspect
import os
import socket
import time
import traceback
from pathlib import Path


def log_path(run_id: str) -> Path:
    """The run's actor log: <cache>/logs/<run id>.log (~/.cache/specoffload unless
    SPECOFFLOAD_CACHE says otherwise), on the node the actors run on."""
    from ..sources.default_model import cache_root

    return cache_root() / "logs" / f"{run_id}.log"


def record(run_id: str, role: str, exc: BaseException):
    """Append `exc`'s traceback to the run's log. An error another guarded actor raised (a
    RayTaskError) is already there."""
    import ray

    if isinstance(exc, ray.exceptions.RayTaskError) or getattr(exc, "_specoffload_logged", False):
        return
    try:
        p = log_path(run_id)
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "a") as f:
            f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {role} (pid {os.getpid()} on "
                    f"{socket.gethostname()})\n{''.join(traceback.format_exception(exc))}\n")
        exc._specoffload_logged = True
    except Exception:  # noqa: BLE001 - no log is no reason to hide the error itself
        pass


def guarded(cls, role: str, run_id: str):
    """A subclass of `cls` for `ray.remote` whose errors are logged and whose constructor's
    error is raised by method calls instead of killing the actor (see the module doc)."""

    def __init__(self, *args, **kwargs):
        self._init_error = None
        try:
            cls.__init__(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - kept for the first call, which the caller waits on
            record(run_id, role, e)
            self._init_error = e

    def wrap(fn):
        @functools.wraps(fn)
        def method(self, *args, **kwargs):
            if self._init_error is not None:
                # a fresh traceback each time: re-raising one object lengthens its traceback
                # with every raise (scripts/ray_failed_calls.py)
                raise self._init_error.with_traceback(None)
            try:
                return fn(self, *args, **kwargs)
            except Exception as e:
                record(run_id, role, e)
                raise

        return method

    ns = {"__init__": __init__, "__module__": cls.__module__, "__doc__": cls.__doc__}
    for name, fn in inspect.getmembers(cls, inspect.isfunction):
        if not name.startswith("_") and not isinstance(inspect.getattr_static(cls, name), staticmethod):
            ns[name] = wrap(fn)
    return type(cls.__name__, (cls,), ns)


def user_error(err: BaseException, run_id: str | None) -> BaseException:
    """What the user sees of `err`, an error from an engine actor (a RayTaskError carrying the
    actor's own exception, or a RayActorError when one died): a SpecOffloadError of the same
    kind with the same message, else an ActorError with the exception's last line; both name
    the log with the actors' tracebacks."""
    from ..errors import ActorError, SpecOffloadError, from_actor_init, root_cause

    cause = root_cause(err)
    if not isinstance(cause, SpecOffloadError):
        cause = from_actor_init(cause)  # an actor that died in its constructor anyway
    where = f" (actor tracebacks: {log_path(run_id)})" if run_id else ""
    lines = str(cause).strip().splitlines()
    if isinstance(cause, SpecOffloadError):
        msg = lines[-1] if lines else type(cause).__name__
        try:
            return type(cause)(msg + where)
        except Exception:  # noqa: BLE001 - a subclass with another constructor
            return ActorError(msg + where)
    first = next((ln.strip() for ln in lines if ln.strip()), "")
    return ActorError(f"an engine actor failed: {type(cause).__name__}: {first}{where}")
