"""Self-checking dataclasses read from JSON (plans, hardware figures): one-line errors."""

from __future__ import annotations

import json
from dataclasses import MISSING, fields
from pathlib import Path

from ..errors import ConfigError


def dataclass_from_dict(cls, d: dict, what: str):
    """cls(**d), refusing fields cls does not have and naming required ones d lacks."""
    if not isinstance(d, dict):
        raise ConfigError(f"a {what} must be a JSON object")
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise ConfigError(f"unknown {what} field(s): {', '.join(sorted(unknown))}")
    missing = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING} - set(d)
    if missing:
        raise ConfigError(f"{what} file lacks: {', '.join(sorted(missing))}")
    return cls(**d)


def read_json(path, what: str):
    """The parsed JSON of a file, or a one-line ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} file not found: {p}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
