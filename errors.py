"""Errors the user can act on. The CLI prints their message on one line and exits 2."""


class SpecOffloadError(Exception):
    """Base class: a clear, one-line, user-facing problem (bad input, bad files, no room)."""


class CheckpointError(SpecOffloadError):
    """A model folder, config or weight file that cannot be used; the message names the file."""


class ConfigError(SpecOffloadError, ValueError):
    """An option or setting out of range."""


class CapacityError(SpecOffloadError):
    """The work does not fit: prompt longer than the context, batch larger than host RAM."""


class OutOfGpuMemoryMidRun(CapacityError):
    """A verification pass, or rows joining a running batch, ran out of GPU memory after the run
    had started: the driver restarts the actors with a smaller footprint and carries on
    (actors/memory_retreat.py). `what`: what ran out, without the advice, for the driver's
    restart line (an attribute survives Ray's pickling of the error, as the message does)."""

    def __init__(self, message: str, what: str | None = None):
        super().__init__(message)
        self.what = what or message


class ActorError(SpecOffloadError):
    """An engine actor failed for a reason that is not the input's (a bug, a lost node, memory
    taken by something else); the message names the log with its traceback. The CLI exits 1."""


def root_cause(err: BaseException) -> BaseException:
    """The exception an engine actor raised, inside the error Ray hands the driver (a
    RayTaskError carries it as `cause`, once per actor hop)."""
    while getattr(err, "cause", None) is not None and err.cause is not err:
        err = err.cause
    return err


def from_actor_init(err: Exception) -> Exception:
    """The user-facing error inside a Ray actor whose constructor raised one, else `err`.

    Ray reports a failed actor constructor as ActorDiedError, whose only trace of the cause is
    its message (the remote traceback, ending "specoffload.errors.<Class>: <message>")."""
    last = None
    for line in str(err).splitlines():
        head, sep, msg = line.strip().partition(": ")
        if sep and head.startswith("specoffload.errors."):
            last = (head.rsplit(".", 1)[1], msg)
    cls = globals().get(last[0]) if last else None
    if isinstance(cls, type) and issubclass(cls, SpecOffloadError):
        return cls(last[1])
    return err
