"""The I/O loader actor: owns the host copy of the target's streamed weights.

At start it reads the checkpoint tensor by tensor (or builds random weights) and writes
each layer once into its own /dev/shm file. The executor maps those same pages and
registers them with CUDA, so layer copies are DMA from page-locked memory with no second
host copy and no per-step object-store traffic. Why shared files rather than pinned
buffers filled in the executor: the loader's process can die and come back without the
executor re-reading anything, and the pages outlive either process until `cleanup`.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from ..sources.open import open_source
from .shm_layout import write_file
from .shm_owners import claim


def default_shm_root() -> Path:
    return Path(os.environ.get("SPECOFFLOAD_SHM", "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"))


def run_dir(run_id: str, shm_root: str | None = None) -> Path:
    """The folder holding one run's weight files (and its mailboxes)."""
    return Path(shm_root or default_shm_root()) / f"specoffload-{run_id}"


def remove_local_run_dir(run_id: str):
    """A run's shared-memory folder, if it is on this node, for when its loader could not
    clean up (killed, or dead with an actor that failed to start)."""
    shutil.rmtree(run_dir(run_id), ignore_errors=True)


class IOLoader:
    def __init__(self, source_desc, run_id: str | None = None, shm_root: str | None = None):
        self.t_up = time.time()  # the process started and imported: the start line's "loader up"
        self.source = open_source(source_desc)
        self.spec = self.source.spec
        self.dir = run_dir(run_id or uuid.uuid4().hex[:8], shm_root)
        self.dir.mkdir(parents=True, exist_ok=True)
        claim(self.dir, "loader")  # a later run removes the folder once its owners are gone
        self.manifest = None

    def ready(self) -> bool:
        return True

    def load(self, layers: list[int], progress: bool = True, threads: int | None = None) -> dict:
        """Write the given layers and the globals into shared memory; returns the manifest
        (paths and tensor layouts) the executor maps. Each file is written to a temporary
        name and renamed, so a reader never maps a half-written layer.

        `threads` layers are read and written at once (default: up to 4, each holding one
        layer in memory meanwhile): the copies and page faults of one thread ran at about
        0.6 GB/s, 152 s for W1's 93 GB (Ray gives an actor one torch thread)."""
        out = {"layers": {}, "globals": None, "tied": False, "dir": str(self.dir)}
        spent, lock = {"read": 0.0, "write": 0.0}, threading.Lock()  # summed over the threads
        bar = tqdm(total=len(layers) + 1, desc="host weights", unit="layer", disable=not progress)
        g = self.source.read_globals()
        out["tied"] = g["head"] is g["embed"]
        if out["tied"]:
            g = {k: v for k, v in g.items() if k != "head"}
        out["globals"] = (str(self.dir / "globals.bin"), write_file(self.dir / "globals.bin", g))
        bar.update(1)

        def one(j: int):
            path = self.dir / f"layer_{j:03d}.bin"
            t = time.perf_counter()
            w = self.source.read_layer(j)  # read, checked, experts stacked (quantized where asked)
            t1 = time.perf_counter()
            entry = (str(path), write_file(path, w))
            with lock:
                spent["read"] += t1 - t
                spent["write"] += time.perf_counter() - t1
            return j, entry

        threads = threads or max(1, min(4, os.cpu_count() or 1, len(layers)))
        with ThreadPoolExecutor(threads, thread_name_prefix="layer-writer") as pool:
            for j, entry in pool.map(one, layers):  # in order; at most `threads` layers in memory ahead
                out["layers"][j] = entry
                bar.update(1)
        bar.close()
        out["times_s"] = {"up": self.t_up, "threads": threads, **{k: round(v, 1) for k, v in spent.items()}}
        self.manifest = out
        return out

    def files(self) -> list[str]:
        return sorted(f.name for f in self.dir.glob("*.bin"))

    def host_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.dir.glob("*.bin"))

    def cleanup(self):
        shutil.rmtree(self.dir, ignore_errors=True)
