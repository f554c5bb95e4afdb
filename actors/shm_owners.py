"""Who owns a run's /dev/shm folder, and removing the folders of runs that died.

A run's weights sit in `specoffload-<run id>/` under the shm root until its loader's cleanup.
A run killed outright (SIGKILL of the driver takes Ray's local processes with it) never cleans
up, and on a large model that is tens of GB of RAM held until reboot. So each process that
owns the folder records itself in `owners.json` (pid, its start time, the host), and the next
run on the machine removes every folder whose recorded processes on this host are all gone,
before it loads, saying how much it reclaimed. Folders without owners.json (a run of an older
version) are left alone: nothing says whether they are in use.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

OWNERS = "owners.json"


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc), which tells a live owner from
    a new process that reuses a dead owner's pid; None where /proc does not say."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def alive(pid: int, start: int | None = None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, someone else's
        pass
    return start is None or _start_time(pid) in (None, start)


def claim(folder, role: str, pid: int | None = None):
    """Record `pid` (default: this process) as an owner of `folder`, keeping earlier owners."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pid = os.getpid() if pid is None else pid
    f = folder / OWNERS
    try:
        owners = json.loads(f.read_text())
    except (OSError, ValueError):
        owners = []
    owners = [o for o in owners if isinstance(o, dict)]
    owners.append({"role": role, "pid": pid, "start": _start_time(pid), "host": socket.gethostname()})
    tmp = folder / f".{OWNERS}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(owners))
    os.replace(tmp, f)  # readers see the old list or the new one, never half


def _folder_bytes(folder: Path) -> int:
    n = 0
    for f in folder.iterdir():
        try:
            n += f.stat().st_blocks * 512  # what it holds in RAM, not its apparent size
        except OSError:
            pass
    return n


def is_stale(folder: Path) -> bool:
    """True when every owner recorded on this host is gone (False without a readable record)."""
    try:
        owners = json.loads((folder / OWNERS).read_text())
    except (OSError, ValueError):
        return False
    host = socket.gethostname()
    mine = [o for o in owners if isinstance(o, dict) and o.get("host") == host and isinstance(o.get("pid"), int)]
    return bool(mine) and not any(alive(o["pid"], o.get("start")) for o in mine)


def sweep(root=None) -> tuple[int, int]:
    """Remove the run folders of dead runs under the shm root: (folders, bytes) reclaimed."""
    from .io_loader import default_shm_root

    root = Path(root or default_shm_root())
    n = b = 0
    try:
        folders = [d for d in root.iterdir() if d.name.startswith("specoffload-") and d.is_dir()]
    except OSError:
        return 0, 0
    for d in folders:
        try:
            if not is_stale(d):
                continue
            size = _folder_bytes(d)
        except OSError:  # removed under us by another run's sweep
            continue
        shutil.rmtree(d, ignore_errors=True)
        if not d.exists():
            n, b = n + 1, b + size
    return n, b


def shm_free_bytes(root=None) -> int:
    """Free bytes under the shm root (tests patch this to play a small /dev/shm)."""
    from .io_loader import default_shm_root

    path = Path(root or default_shm_root())
    while not path.exists() and path != path.parent:  # a root the loader has yet to create: its file system
        path = path.parent
    return shutil.disk_usage(path).free


def host_weight_bytes(spec, plan) -> int:
    """Bytes the loader will write to shared memory: the layers not left on disk, and the globals."""
    import torch

    item = torch.empty((), dtype=spec.torch_dtype).element_size()
    layers = spec.num_layers - len(plan.disk_layers)
    glob = spec.vocab_size * spec.hidden_size * (1 if spec.tie_embeddings else 2) + spec.hidden_size
    return layers * spec.layer_bytes() + glob * item


def _size(b: int) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def prepare(spec, plan, log=None):
    """Before a run loads: remove dead runs' folders (one line on `log` saying what came back),
    then check the weights fit in what the shm root has free (a one-line CapacityError if not)."""
    import sys

    from ..errors import CapacityError
    from .io_loader import default_shm_root

    n, b = sweep()
    if n:
        print(f"specoffload: removed {n} shared-memory folder(s) of dead runs from {default_shm_root()}, "
              f"reclaimed {_size(b)}", file=log or sys.stderr)
    need, free = host_weight_bytes(spec, plan), shm_free_bytes()
    if need > free:
        raise CapacityError(f"the target's host weights need {need / 2**30:.2f} GiB in {default_shm_root()} and "
                            f"{free / 2**30:.2f} GiB is free; free it, raise its size, or leave layers on disk "
                            f"(plan disk_layers)")
    return n, b
