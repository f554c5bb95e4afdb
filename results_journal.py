"""`--out` as a journal: each finished request appended durably, so a rerun resumes.

A line is {"index", "key", ...result}: `index` is the prompt's place in the run's prompt list,
`key` a hash of that prompt and its sampling parameters (and the model). Each line goes out in
one `write` on an O_APPEND descriptor and is fsync'd before the next, so a killed run leaves
whole lines plus at most one torn last line, which the next open truncates away. Running the
same command again keeps the lines there, skips the requests they cover and runs the rest; a
file written for other prompts or parameters is refused (one line), never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path

from .errors import ConfigError

_PREFIX = b'{"index": '  # every line this module writes starts so (json.dumps, index first)


def request_key(prompt, params, salt: str = "") -> str:
    """A short hash of what decides a request's result: its prompt, its sampling parameters and
    `salt` (the model, whether the chat template wraps the prompt)."""
    p = asdict(params) if is_dataclass(params) else dict(params)
    blob = json.dumps({"prompt": prompt, "params": p, "salt": salt}, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Journal:
    """An --out file opened for resuming: `done` maps index -> record already there."""

    def __init__(self, path, keys: list[str]):
        self.path, self.keys = Path(path), keys
        self.done: dict[int, dict] = {}
        self.torn = 0  # bytes of a torn last line dropped at open
        self._fd = None
        self._scan()

    # -- reading what is there -------------------------------------------------------------
    def _scan(self):
        p = self.path
        if p.is_dir():
            raise ConfigError(f"cannot write --out {p}: it is a directory")
        if not p.exists():
            return
        try:
            data = p.read_bytes()
        except OSError as e:
            raise ConfigError(f"cannot read --out {p}: {e.strerror}") from None
        good = 0  # bytes of whole, valid lines
        lines = data.split(b"\n")
        for n, raw in enumerate(lines, 1):
            last = n == len(lines)
            if last and not raw:
                break  # the file ends with a newline
            if last and raw.startswith(_PREFIX[: len(raw)]):
                # No newline after it: the run before was killed mid-write (one write carries a
                # line and its newline). Drop it; that request runs again.
                self.torn = len(raw)
                break
            rec = None if last else self._parse(raw)  # a last line without newline is not ours
            self._check(rec, n, raw)
            self.done[rec["index"]] = rec
            good += len(raw) + 1
        if self.torn:
            os.truncate(p, good)

    @staticmethod
    def _parse(raw: bytes):
        try:
            rec = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return None
        return rec if isinstance(rec, dict) else None

    def _check(self, rec, n: int, raw: bytes):
        p = self.path
        if rec is None or not isinstance(rec.get("index"), int) or "key" not in rec:
            raise ConfigError(f"--out {p} exists and line {n} is not a result line of specoffload; "
                              f"give another --out (it is never overwritten)")
        i = rec["index"]
        if not 0 <= i < len(self.keys) or rec["key"] != self.keys[i]:
            raise ConfigError(f"--out {p} holds results for other prompts or parameters (line {n}, index {i}); "
                              f"give another --out or remove it (it is never overwritten)")
        if i in self.done:
            raise ConfigError(f"--out {p}: line {n} repeats index {i}; the file was edited, give another --out")

    # -- appending -------------------------------------------------------------------------
    def pending(self) -> list[int]:
        return [i for i in range(len(self.keys)) if i not in self.done]

    def append(self, index: int, record: dict):
        """Write one whole line for request `index` and fsync it before returning."""
        if index in self.done:
            raise RuntimeError(f"request {index} is already in {self.path}")  # a bug, not input
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        line = (json.dumps({"index": index, "key": self.keys[index], **record}) + "\n").encode()
        view = memoryview(line)
        while view:  # one write for a line of any normal size; the loop covers a short write
            view = view[os.write(self._fd, view):]
        os.fsync(self._fd)
        self.done[index] = record

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def open_journal(path: str | None, keys: list[str]):
    """A Journal for --out (None without one); a ConfigError names what is wrong with the file."""
    if not path:
        return None
    j = Journal(path, keys)
    if not j.path.exists():  # fail now, before any model loads, if the folder cannot take it
        parent = j.path.parent
        if not parent.is_dir():
            raise ConfigError(f"cannot write --out {path}: No such file or directory")
        if not os.access(parent, os.W_OK):
            raise ConfigError(f"cannot write --out {path}: permission denied")
    elif not os.access(j.path, os.W_OK):
        raise ConfigError(f"cannot write --out {path}: permission denied")
    return j
