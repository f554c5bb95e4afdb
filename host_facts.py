"""What the host was and was doing when a benchmark started: its CPU model and how busy its
CPUs already were, and by which processes.

Calls on "the same kind" of device machine differ: in session 34 the same w1-long baseline gave
635.9 tok/s where session 33 gave 695.2, its CPU attention taking 13% longer with the same code,
and nothing in the JSON could say whether the host's CPU was another model or already busy.
CPU attention bounds most layers, so a figure is only comparable beside these facts.
Linux's /proc only; elsewhere the fields are None.
"""

from __future__ import annotations

import os
import time

from .memory_facts import thp_modes


def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def mem_available_gib() -> float | None:
    """/proc/meminfo's MemAvailable: what a run's host KV cache can take without evicting."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat's first line."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def _process_ticks() -> dict[int, tuple[str, int]]:
    """pid -> (command name, user + system jiffies) of every process readable now."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                text = f.read()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        # The command name is in parentheses and may itself hold spaces or parentheses.
        comm = text[text.index("(") + 1: text.rindex(")")]
        rest = text[text.rindex(")") + 2:].split()
        out[int(name)] = (comm, int(rest[11]) + int(rest[12]))  # utime, stime (fields 14, 15)
    return out


def sample() -> tuple:
    """The host's CPU ticks and every process's, now: two samples make `between`'s figures."""
    return _cpu_ticks(), _process_ticks() if os.path.isdir("/proc") else {}, time.monotonic()


def between(first: tuple, second: tuple, min_share: float = 0.2, top: int = 5) -> dict:
    """Between two `sample`s: the share of all CPUs busy, and the processes that kept at least
    `min_share` of one core busy (pid, name, cores; the busiest `top`, this process left out)."""
    (before, procs, t0), (after, procs2, t1) = first, second
    out = {"busy": None, "busy_processes": []}
    if before and after and after[1] > before[1]:
        out["busy"] = round((after[0] - before[0]) / (after[1] - before[1]), 3)
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    me, wall = os.getpid(), max(t1 - t0, 1e-6)
    busy = []
    for pid, (comm, ticks) in procs2.items():
        if pid == me or pid not in procs:
            continue
        cores = (ticks - procs[pid][1]) / hz / wall
        if cores >= min_share:
            busy.append({"pid": pid, "name": comm, "cores": round(cores, 2)})
    out["busy_processes"] = sorted(busy, key=lambda p: -p["cores"])[:top]
    return out


def snapshot(window_s: float = 0.5, min_share: float = 0.2) -> dict:
    """The CPU model, cores, load averages, the share of all CPUs busy over `window_s`, and the
    processes that kept at least `min_share` of one core busy meanwhile (pid, name, cores)."""
    facts = {"cpu": cpu_model(), "cores": os.cpu_count(), "loadavg": None, "busy": None, "busy_processes": [],
             "thp": thp_modes(), "mem_available_gib": mem_available_gib()}
    try:
        facts["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    first = sample()
    time.sleep(window_s)
    facts.update(between(first, sample(), min_share))
    return facts


def describe(facts: dict) -> str:
    """One line for a benchmark's header."""
    parts = [facts.get("cpu") or "CPU model unknown", f"{facts.get('cores')} cores"]
    if facts.get("loadavg"):
        parts.append("load " + "/".join(f"{x:.1f}" for x in facts["loadavg"]))
    if facts.get("busy") is not None:
        parts.append(f"{facts['busy']:.0%} of the CPUs busy before the start")
    if facts.get("mem_available_gib") is not None:
        parts.append(f"{facts['mem_available_gib']:.0f} GiB memory available")
    if facts.get("thp"):
        parts.append(f"transparent huge pages {facts['thp']['enabled']} (defrag {facts['thp']['defrag']})")
    line = "host: " + ", ".join(parts)
    if facts.get("busy_processes"):
        line += " (" + ", ".join(f"{p['name']} pid {p['pid']} {p['cores']:.1f} cores" for p in facts["busy_processes"]) + ")"
    return line


def warning(facts: dict, limit: float = 0.1) -> str | None:
    """A line to print where other work already kept the CPUs busy: CPU attention will share them."""
    if facts.get("busy") is not None and facts["busy"] >= limit:
        return (f"warning: {facts['busy']:.0%} of the CPUs were busy before the benchmark started; "
                f"its CPU attention shares them, so its figures may be low")
    return None
