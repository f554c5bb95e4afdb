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
    except UnicodeDecodeError:  # a binary file (a pickle, say): never read as anything but JSON
        raise ConfigError(f"{p}: not valid JSON (not UTF-8 text)") from None


class JsonFile:
    """`from_dict` / `from_file` for a self-checking dataclass; `json_what` names it in errors
    (a class attribute without annotation, so not a dataclass field)."""

    json_what = "config"

    @classmethod
    def from_dict(cls, d: dict):
        return dataclass_from_dict(cls, d, cls.json_what)

    @classmethod
    def from_file(cls, path):
        return cls.from_dict(read_json(path, cls.json_what))
