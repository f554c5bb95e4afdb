"""A private Ray head for tests that need a real cluster (`ray start --head`), and a stop
that ends only its processes.

Why not `ray stop --force`: in Ray 2.60 it kills every Ray process of the machine (the
session fixture's Ray, other people's runs); it has no --address or --temp-dir filter. The
head here is started in its own session (setsid), so its daemons, workers and job drivers
all carry that session id; `stop` kills exactly those, plus anything whose command line
names the head's private temp dir.

Auth and $HOME: Ray 2.60 enables token auth by default and keeps the token under ~/.ray;
the head and every CLI call get RAY_AUTH_MODE=disabled and HOME set to a private folder.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env(home: Path) -> dict:
    """The environment for `ray` CLI calls: auth off, a private $HOME, this venv first on PATH
    (the job entrypoint's `python` is looked up on the head's PATH)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", HOME=str(home),
               PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
               TOKENIZERS_PARALLELISM="false")
    return env


def ray_cli() -> str:
    return shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"


@dataclass
class RayHead:
    root: Path
    gcs_port: int
    dashboard_port: int
    metrics_port: int
    env: dict
    sid: int = 0
    log: list = field(default_factory=list)
    temp_dir: Path | None = None  # default: a new short folder under /tmp

    def __post_init__(self):
        # Short on purpose: Ray puts AF_UNIX sockets under <temp>/session_<date>_<pid>/sockets/,
        # and a socket path over 107 bytes fails (a pytest tmp path such as
        # /tmp/pytest-of-root/pytest-107/rayjob0/ray made the dashboard's MetricsHead fail).
        self.temp_dir = Path(self.temp_dir) if self.temp_dir else Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def cli(self, *args, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess:
        p = subprocess.run([ray_cli(), *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        self.log.append(f"$ ray {' '.join(args)}\n(rc {p.returncode})\n{p.stdout}\n{p.stderr}")
        if check and p.returncode != 0:
            raise AssertionError(self.log[-1][-6000:])
        return p


def start_head(root: Path, num_cpus: int = 4, dashboard: bool = True) -> RayHead:
    root = Path(root)
    (root / "home").mkdir(parents=True, exist_ok=True)
    head = RayHead(root, free_port(), free_port(), free_port(), ray_env(root / "home"))
    # Every port this head binds is a free one: Ray's fixed defaults (client server 10001,
    # dashboard agent 52365, dashboard / autoscaler metrics 44227 / 44217) collide with any
    # other Ray on the machine, and a taken agent port means "No available agent to submit job".
    head.env.update(DASHBOARD_METRIC_PORT=str(free_port()), AUTOSCALER_METRIC_PORT=str(free_port()))
    # Ray gives a raylet 30 s to register with the GCS; on CI's 2 cores, beside the test
    # session's own cluster, that once ran out ("The current node timed out during startup").
    head.env.setdefault("RAY_raylet_start_wait_time_s", "120")
    args = ["start", "--head", "--node-ip-address=127.0.0.1", f"--port={head.gcs_port}",
            f"--num-cpus={num_cpus}", f"--temp-dir={head.temp_dir}",
            f"--metrics-export-port={head.metrics_port}", f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--object-store-memory={300 * 2**20}", "--disable-usage-stats"]
    if dashboard:
        args += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={head.dashboard_port}"]
    else:
        args += ["--include-dashboard=false"]
    # Its own session: every process of this head (daemons, workers, job drivers) has sid == pid.
    proc = subprocess.Popen([ray_cli(), *args], env=head.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    head.sid = proc.pid
    try:
        out, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        stop_head(head)
        raise
    head.log.append(f"$ ray {' '.join(args)}\n(rc {proc.returncode})\n{out}")
    if proc.returncode != 0:
        stop_head(head)
        raise RuntimeError(f"ray start failed:\n{out[-4000:]}")
    return head


def _procs() -> dict:
    """pid -> (ppid, sid, argv) for the machine's processes, from /proc."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        out[int(d)] = (int(fields[1]), int(fields[3]), argv)  # ppid, (pgrp), session
    return out


def head_processes(head: RayHead) -> list[int]:
    """Pids of this head: its session, anything naming its temp dir, and their descendants."""
    key = re.compile(re.escape(str(head.temp_dir)) + r"(/|$|\s)")
    # The Ray client server names neither the temp dir nor a parent: its --address names the GCS.
    gcs = re.compile(r"--(gcs-)?address=\S+:%d(\s|$)" % head.gcs_port) if head.gcs_port else None
    procs = _procs()
    roots = {pid for pid, (_, sid, argv) in procs.items()
             if (head.sid and sid == head.sid) or any(key.search(a) for a in argv)
             or (gcs and "ray" in " ".join(argv) and any(gcs.search(a) for a in argv))}
    children: dict[int, list] = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    found.discard(os.getpid())
    return sorted(found)


def _kill(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def stop_head(head: RayHead, timeout: float = 15) -> int:
    """`ray stop --force`, for this head only: SIGKILL its processes. Returns how many."""
    pids = head_processes(head)
    _kill(pids)
    deadline = time.time() + timeout
    while time.time() < deadline:  # until gone (a worker forked during the scan included)
        rest = [p for p in head_processes(head) if _alive(p)]
        if not rest:
            break
        _kill(rest)
        time.sleep(0.2)
    return len(pids)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # zombies are dead
    except OSError:
        return False


if __name__ == "__main__":
    # python tests/ray_head.py stop TEMP_DIR GCS_PORT: `ray stop --force` for the head started
    # with --temp-dir=TEMP_DIR --port=GCS_PORT only (docs/ray_usage.md uses it).
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["stop"])
    ap.add_argument("temp_dir")
    ap.add_argument("gcs_port", type=int)
    a = ap.parse_args()
    h = RayHead(Path(a.temp_dir).parent, a.gcs_port, 0, 0, {}, temp_dir=Path(a.temp_dir))
    print(f"stopped {stop_head(h)} processes")
