"""Kill the driver at random points of a run, rerun the same command, and check the results file.

    python scripts/kill_rerun.py --cycles 20

Each cycle runs `specoffload generate --out results.jsonl` (the actor engine, on a tiny model,
joining a Ray cluster this script holds), SIGKILLs the driver process at a random point (before
loading, mid-load, between or during result writes), and runs the same command again. The
last run is left to finish. Then: every request present exactly once, no torn line, each
output equal to the reference engine's, and every dead run's /dev/shm folder removed by the
run after it (the script gives the actors their own shm root, so other runs on the machine are
neither seen nor touched). Prints a table; exits 1 if anything was lost, duplicated or left.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n") if path.exists() else []


def _owners_dead(shm: Path, timeout: float = 30.0) -> bool:
    """Wait until every run folder's recorded owners are gone (Ray kills a dead driver's actors)."""
    from specoffload.actors.shm_owners import is_stale

    t0 = time.time()
    while time.time() - t0 < timeout:
        dirs = [d for d in shm.iterdir() if d.name.startswith("specoffload-")]
        if all(is_stale(d) or not (d / "owners.json").exists() for d in dirs):
            return True
        time.sleep(0.2)
    return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=20, help="kill-and-rerun cycles before the final run")
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kill-within", type=float, default=40.0,
                    help="time-drawn kills land in [0, this many seconds] after the start (default 40: "
                         "start-up here takes ~40 s of a run)")
    ap.add_argument("--workdir", help="where to put the model, prompts and results (default: a temp dir)")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kill_rerun_"))
    work.mkdir(parents=True, exist_ok=True)
    shm = work / "shm"
    shm.mkdir(exist_ok=True)
    os.environ["SPECOFFLOAD_SHM"] = str(shm)  # before Ray starts: its workers inherit it

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import make_tiny_with_tokenizer

    model = work / "model"
    if not (model / "config.json").exists():
        make_tiny_with_tokenizer("llama", model, seed=0)
    prompts = [" ".join(f"w{3 + (5 * i + 3 * j) % 90}" for j in range(1 + (7 * i) % 40)) for i in range(args.requests)]
    pfile = work / "prompts.txt"
    pfile.write_text("\n".join(prompts) + "\n")
    out = work / "results.jsonl"
    out.unlink(missing_ok=True)

    import ray

    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="ray_", dir="/tmp"))
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    cmd = [sys.executable, "-m", "specoffload.cli", "generate", "--model", str(model), "--prompts", str(pfile),
           "--out", str(out), "--max-tokens", str(args.max_tokens), "--ignore-eos", "--batch-size", "4",
           "--device", "cpu", "--quiet", "--no-chat-template"]

    from specoffload.configs.sampling_params import SamplingParams
    from specoffload.llm import LLM

    ref = LLM(str(model), engine="reference", progress=False, batch_size=4)
    want = [o.outputs[0].token_ids for o in ref.generate(
        [{"prompt_token_ids": ref.tokenizer(p, add_special_tokens=False)["input_ids"]} for p in prompts],
        SamplingParams(max_tokens=args.max_tokens, ignore_eos=True))]
    totals = {"lost": 0, "duplicated": 0, "wrong": 0, "unparseable": 0, "torn_at_end": 0}

    def check_complete():
        """A run finished: check its file, then start the next round on an empty one."""
        recs = {}
        data = out.read_bytes()
        totals["torn_at_end"] += not data.endswith(b"\n")
        for line in data.splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                totals["unparseable"] += 1
                continue
            totals["duplicated"] += r["index"] in recs
            recs[r["index"]] = r
        totals["lost"] += sum(i not in recs for i in range(args.requests))
        totals["wrong"] += sum(r["token_ids"] != want[i] for i, r in recs.items())
        out.rename(work / f"results_round{rounds}.jsonl")

    rows, torn_seen, reclaimed, left_dead, rounds = [], 0, 0, 0, 0
    for c in range(args.cycles + 1):
        final = c == args.cycles
        before = sum(1 for x in _lines(out) if x.endswith(b"}"))
        if before == args.requests:  # the last run was killed after its last line: a round done
            check_complete()
            rounds += 1
            before = 0
        # Where to kill: after a random time (most of a run here is start-up: imports, joining
        # Ray, loading the weights), or once the file holds a random number of new lines (in the
        # middle of the passes, or after the last line, while it shuts down), a little later still.
        by_time = rng.random() < 0.4
        deadline = rng.uniform(0, args.kill_within) if by_time else None
        target = None if by_time else before + rng.randint(1, args.requests - before)
        extra = rng.uniform(0, 0.3)
        errf = work / f"stderr_{c}.txt"
        t0 = time.time()
        with open(errf, "w") as ef:
            p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=ef, env=env)
            killed_at = None
            while p.poll() is None:
                if not final and (time.time() - t0 >= deadline if by_time else
                                  len([x for x in _lines(out) if x]) >= target):
                    time.sleep(0 if by_time else extra)
                    if p.poll() is None:
                        os.kill(p.pid, signal.SIGKILL)
                        killed_at = len([x for x in _lines(out) if x])
                    break
                time.sleep(0.02)
            rc = p.wait()
        err = errf.read_text()
        torn_seen += "dropped a torn last line" in err
        if "reclaimed" in err:
            reclaimed += int(err.split("removed ")[1].split(" ")[0])
        raw = _lines(out)
        torn_now = bool(raw and raw[-1])  # bytes after the last newline
        after = len([x for x in raw if x])
        what = (f"kill at {time.time() - t0:.1f} s" if by_time else f"kill at {killed_at} lines") \
            if killed_at is not None else ("finished" if rc == 0 else f"rc {rc}")
        rows.append((c, rounds, what, rc, before, after, torn_now, round(time.time() - t0, 1)))
        if rc == 0:
            check_complete()
            rounds += 1
        elif killed_at is None:
            print(err, file=sys.stderr)
            totals["lost"] += 1  # a run that failed by itself is a failure here
        if not _owners_dead(shm):
            left_dead += 1
    ray.shutdown()
    leftover = sorted(d.name for d in shm.iterdir())

    print(f"{'cycle':>5} {'round':>5} {'what':<20} {'rc':>4} {'lines before':>12} {'lines after':>11} {'torn':>5} {'s':>6}")
    for r in rows:
        print(f"{r[0]:>5} {r[1]:>5} {r[2]:<20} {r[3]:>4} {r[4]:>12} {r[5]:>11} {str(r[6]):>5} {r[7]:>6}")
    print(f"{rounds} complete rounds of {args.requests} requests: lost {totals['lost']}, duplicated "
          f"{totals['duplicated']}, wrong {totals['wrong']}, unparseable lines {totals['unparseable']}, torn last "
          f"line at the end {totals['torn_at_end']}; torn lines dropped on rerun {torn_seen}; dead runs' shm "
          f"folders removed by the next run {reclaimed}; shm folders left at the end {len(leftover)}; owners "
          f"still alive 30 s after a kill {left_dead}")
    ok = rounds >= 1 and not (any(totals.values()) or leftover or left_dead)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
