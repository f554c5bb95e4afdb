"""Errors the user can act on. The CLI prints their message on one line and exits 2."""


class SpecOffloadError(Exception):
    """Base class: a clear, one-line, user-facing problem (bad input, bad files, no room)."""


class CheckpointError(SpecOffloadError):
    """A model folder, config or weight file that cannot be used; the message names the file."""


class ConfigError(SpecOffloadError, ValueError):
    """An option or setting out of range."""


class CapacityError(SpecOffloadError):
    """The work does not fit: prompt longer than the context, batch larger than host RAM."""
