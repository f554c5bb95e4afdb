"""`bench --accelerate N[:T[:RESERVE]]`: what users run instead, timed in the same bench call.

After the modes (and once their actors and Ray have let go of host memory), transformers +
accelerate offload (`device_map="auto"` under the same --gpu-memory) runs the same target shape
on the first N of the requests the modes ran, T new tokens each, in a process of its own
(`scripts/accelerate_baseline.py`, which builds W1's Mixtral-shaped target in host memory with
random bf16 weights: speed depends on the shapes, not the values). So the ratio comes from one
run, on the same prompts, rather than from two calls' notes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "scripts" / "accelerate_baseline.py"


@dataclass(frozen=True)
class AccelerateRun:
    requests: int = 8
    tokens: int = 3
    # of the cap, what accelerate leaves for activations: its default 2 GiB ran W1's 8 prompts
    # (up to 700 tokens, left-padded) out of memory in session 17; 6 GiB ran them in session 18
    reserve: str = "6GiB"

    def __post_init__(self):
        if self.requests < 1 or self.tokens < 1:
            raise ValueError(f"needs N >= 1 requests and T >= 1 tokens, got {self.requests}:{self.tokens}")


def parse(text: str) -> AccelerateRun:
    """'N', 'N:T' or 'N:T:RESERVE' (e.g. 8:3:6GiB)."""
    parts = text.split(":")
    if not 1 <= len(parts) <= 3:
        raise ValueError(f"needs N[:T[:RESERVE]], got {text!r}")
    try:
        nums = [int(p) for p in parts[:2]]
    except ValueError:
        raise ValueError(f"needs N[:T[:RESERVE]] with whole numbers N and T, got {text!r}") from None
    if len(parts) == 3:
        from specoffload.placement.plan import parse_bytes

        parse_bytes(parts[2])  # a bad size fails here, before any mode runs
    return AccelerateRun(*nums, *parts[2:])


def run(spec: AccelerateRun, prompts: list[list[int]], layers: int, gpu_memory: str) -> dict:
    """The script's JSON row for the first spec.requests of `prompts`; raises RuntimeError with
    its last error line if it fails (a missing package, out of GPU memory even for one prompt)."""
    if not SCRIPT.is_file():
        raise RuntimeError(f"needs {SCRIPT} (bench run from a source checkout)")
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="accelerate_prompts_") as f:
        json.dump(prompts[: spec.requests], f)
        f.flush()
        cmd = [sys.executable, str(SCRIPT), "--layers", str(layers), "--prompts", f.name,
               "--requests", str(spec.requests), "--tokens", str(spec.tokens), "--gpu-memory", gpu_memory,
               "--reserve", spec.reserve]
        print(f"transformers + accelerate: {' '.join(cmd[1:])}", flush=True)
        # its progress (a halved batch, load warnings) goes straight to bench's stderr
        r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = r.stdout.splitlines()
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"exit status {r.returncode} (its error is the line above)")
    if len(lines) > 1:
        print(lines[1], flush=True)  # its summary line
    return json.loads(lines[0])


def against(row: dict, results: list[dict]) -> str:
    """One line: what accelerate made, and each mode's ratio to it, end to end (tokens over the
    whole wall time, prefill included: ours over the whole job, accelerate's over its T tokens)
    and in decode (tokens per second after the first token)."""
    head = (f"transformers + accelerate (device_map=auto under the same cap, {row['modules_on_gpu']}/"
            f"{row['modules']} modules on the GPU, the first {row['requests']} of these requests padded to "
            f"{row['longest_prompt']} tokens, {row['tokens']} new tokens each, bf16): {row['tokens_per_s']} tok/s "
            f"end to end, {row['decode_tokens_per_s']} decode tok/s ({row['s_per_token_step']} s a step)")
    ratios = []
    for r in results:
        e2e = r["tokens_per_s"] / row["tokens_per_s"] if row["tokens_per_s"] else float("nan")
        dec = (r["decode_tokens_per_s"] / row["decode_tokens_per_s"] if row.get("decode_tokens_per_s")
               else float("nan"))
        ratios.append(f"{r['mode']} {e2e:.0f}x e2e {dec:.0f}x decode")
    return head + ("; against it: " + ", ".join(ratios) if ratios else "")
