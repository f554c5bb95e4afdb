"""The GPU check: what users run, on a GPU, with one table at the end. CI has no GPU; this is its
stand-in. Run it on a GPU machine whenever a change touches what the GPU runs:

    python scripts/gpu_check.py --work /tmp/gpucheck --logs gpu_check_logs   # --steps tests,generate,... picks parts
    python scripts/gpu_check.py --work /tmp/gc16 --steps disk --target-layers 16 --jobs 1   # the disk tier, W1-half target

It writes random Hugging Face checkpoints to disk (a Mixtral-8x7B-shaped target with a few
layers, a 2-layer one, a Mistral-7B-shaped draft with the same tokenizer), then runs, each as a
user would: `specoffload generate` without and with the draft (flags by hand, `--plan auto` with
bf16 and fp8 drafts, half the target's layers read from disk each pass) under a 24 GiB cap
with `--out` JSONL, the 2-layer target in float32 plain
and speculative with rows refilled (every token equal: the lossless check), the Python `LLM`
API, the GPU executor killed mid-run (restarted, output as plain decoding), a Ray job
submitted to a `ray start` head, `specoffload plan`, `specoffload bench
--workload w1-small` (shortened), a refilled job (`bench --workload w1-long-tiny`, a draft
graph captured again at each of its ~70 joins), the target quantized to fp8 at load (`generate --quantize fp8`
plain and speculative, `bench --target-fp8` with the prefill fused and not), a tiny checkpoint of every family through the
actors on the GPU against transformers, and every CUDA-only test. Each row asserts exit 0 and
every output present; bf16 speculative rows also that log probabilities move no more than
rounding (see `Check.same`). Exit status 1 if any row fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CAP = "24GiB"
# The `ray` command, or its module where Ray was unpacked without scripts (the GPU machine).
RAY = ["ray"] if shutil.which("ray") else [sys.executable, "-m", "ray.scripts.scripts"]
SMALL_STEPS = {"tests", "lossless", "families"}  # steps that need no Mixtral target or 7B draft
DRAFT_STEPS = {"generate", "api", "plan", "fp8"}  # steps that run the Mistral-shaped draft
# The CUDA-only tests in processes side by side: the two slow files alone, the rest together
# (on the H200 five tests took 44-53 s each, 235 of the suite's 283 s).
TEST_GROUPS = (("placement", ["tests/test_gpu_placement.py"]), ("fp8 target", ["tests/test_fp8_target_gpu.py"]),
               ("the rest", ["--ignore=tests/test_gpu_placement.py", "--ignore=tests/test_fp8_target_gpu.py"]))
# Engine rows in the order they start, plain decoding first (the others compare with it), then
# the longest first so that the pool ends evenly (seconds on the H200, session 15: families part 1
# 190, part 2 130, restart 122, bf16 draft rows 110-120, fp8 113, the job 97, the rest 60-95).
# A row that compares with another's outputs comes after it.
ORDER = ("plain", "families1", "families2", "restart", "auto", "hand", "disk", "autofp8", "plain_fp8", "auto_q8",
         "job", "plain32", "spec32", "api", "bench_fp8", "bench", "bench_job")
STEPS = ("tests", "generate", "disk", "lossless", "api", "restart", "job", "plan", "families", "bench", "fp8")
# The refilled job's row: its requests, and the joins (each a draft recapture) it must make, past
# the 32 streams of torch's pool (48 requests made 34 joins on the CPU).
JOB_REQUESTS, JOB_JOINS = 96, 40


class Outputs:
    """A row's outputs that other rows compare with once that row has finished (rows run side by
    side): get() waits; setting() marks them final however the row ends."""

    def __init__(self):
        self.value: dict[int, dict] = {}
        self.ready = threading.Event()

    def get(self) -> dict[int, dict]:
        self.ready.wait()
        return self.value

    @contextlib.contextmanager
    def setting(self):
        try:
            yield self
        finally:
            self.ready.set()


class Check:
    def __init__(self, work: Path, logs: Path, n_prompts: int, max_tokens: int, target_layers: int,
                 time_limit: float | None = None, plain_file: Path | None = None, jobs: int = 4):
        self.work, self.logs, self.plain_file, self.jobs = work, logs, plain_file, jobs
        self.t_begin = time.perf_counter()
        # past it no command starts, and a running one is stopped, so a call with a hard limit
        # still ends with its table
        self.deadline = self.t_begin + time_limit if time_limit else None
        self.n, self.max_tokens, self.target_layers = n_prompts, max_tokens, target_layers
        self.rows: list[tuple[str, bool, float, str, float]] = []  # name, passed, seconds, note, started at
        self.lock = threading.Lock()  # steps.log and the rows: steps run side by side
        self.local = threading.local()  # this thread's last command: started when, skipped or not
        self.plain = Outputs()  # plain decoding's, the rows' reference
        self.env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
                        TOKENIZERS_PARALLELISM="false")
        # Each run side by side starts a Ray cluster of its own (Ray gives a run the node's one
        # GPU, so runs on one cluster would queue), without a dashboard (one port for all);
        # the `ray start` head and its dashboard serve the Ray job row.
        self.env_local = dict(self.env, RAY_ADDRESS="local", SPECOFFLOAD_DASHBOARD="0")
        self.head_env = dict(self.env, RAY_ADDRESS="127.0.0.1:6379")

    @property
    def skipped(self) -> bool:
        """This thread's last command was not run: past the deadline."""
        return getattr(self.local, "skipped", False)

    @property
    def cut(self) -> bool:
        """This thread's last command was killed at the deadline (not at its own timeout)."""
        return getattr(self.local, "cut", False)

    # -- running -------------------------------------------------------------------------------
    def run(self, name: str, cmd: list[str], timeout: int = 300, env: dict | None = None, always: bool = False):
        """Run a command, its output to logs/steps.log, each line stamped with the seconds since
        the start (where a slow step spends its time); (rc, stdout+stderr, seconds). Past the
        --time-limit it runs nothing: rc 125; one still running at the limit is killed: rc 124."""
        t0 = time.perf_counter()
        cmd = [str(c) for c in cmd]
        self.local.skipped, self.local.cut, self.local.started = False, False, t0 - self.t_begin
        by_deadline = False
        if self.deadline is not None and not always:
            left = self.deadline - t0
            if left < 15:
                self.local.skipped = True
                with self.lock, open(self.logs / "steps.log", "a") as f:
                    f.write(f"\n===== {name}: skipped, past --time-limit\n")
                return 125, "", 0.0
            by_deadline = int(left) < timeout
            timeout = min(timeout, int(left))
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env or self.env,
                             cwd=REPO, start_new_session=True)
        lines: list[str] = []

        def read():
            for ln in p.stdout:
                lines.append(f"[{time.perf_counter() - t0:6.1f}] {ln}")

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # its Ray workers too
            p.wait()
            rc = 124
            self.local.cut = by_deadline
            lines.append(f"timed out after {timeout} s{' (--time-limit)' if by_deadline else ''}\n")
        reader.join(timeout=10)
        dt = time.perf_counter() - t0
        text = "".join(lines)
        with self.lock, open(self.logs / "steps.log", "a") as f:  # one file: every step's command and output
            f.write(f"\n===== {name} (rc {rc}, {dt:.1f} s, started at {t0 - self.t_begin:.0f} s)\n"
                    f"$ {' '.join(cmd)}\n{text}")
        return rc, re.sub(r"^\[ *[0-9.]+\] ", "", text, flags=re.M), dt

    def row(self, name: str, ok: bool, seconds: float, note: str, started: float | None = None):
        if self.skipped:
            ok, note = False, "skipped: past --time-limit"
        elif self.cut:  # not a failure of its own: the check ran out of time
            ok, note = False, f"stopped at --time-limit after {seconds:.0f} s; {note}"
        started = getattr(self.local, "started", 0.0) if started is None else started
        with self.lock:
            self.rows.append((name, bool(ok), seconds, note, started))
            print(f"[{'PASS' if ok else 'FAIL'}] {name} ({seconds:.0f} s from {started:.0f} s): {note}", flush=True)

    def cli(self, *args) -> list[str]:
        return [sys.executable, "-m", "specoffload.cli", *map(str, args)]

    # -- the steps -----------------------------------------------------------------------------
    def start_checkpoints(self, steps: set) -> list:
        """Start writing the checkpoints, each in a process of its own; `write_checkpoints` waits
        for them."""
        self.t_write = time.perf_counter()
        # named by layer count: --work is reused, and another count must not find this one
        self.target, self.draft = self.work / f"mixtral-{self.target_layers}L", self.work / "mistral"
        self.small = self.work / "mixtral-2L"  # the lossless step's target: fp32 doubles its bytes
        procs = []
        for folder, shape, layers in ((self.target, "mixtral-8x7b", self.target_layers),
                                      (self.draft, "mistral-7b", None), (self.small, "mixtral-8x7b", 2)):
            # the lossless and families steps alone need only the small target (or none)
            if (folder == self.small and "lossless" not in steps) or (folder != self.small and not steps - SMALL_STEPS):
                continue
            if folder == self.draft and not steps & DRAFT_STEPS:  # --steps disk on a deeper target: no draft
                continue
            if not (folder / "model.safetensors.index.json").is_file():
                log = open(self.logs / f"write_{folder.name}.log", "w")
                cmd = [sys.executable, str(REPO / "scripts" / "random_checkpoint.py"), "--shape", shape, "--out",
                       str(folder)] + (["--layers", str(layers)] if layers else [])
                procs.append((shape, folder.name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                                   env=self.env, cwd=REPO)))
        return procs

    def write_checkpoints(self, procs: list):
        for shape, name, p in procs:
            if p.wait(timeout=900) != 0:
                self.row("write checkpoints", False, time.perf_counter() - self.t_write,
                         f"random_checkpoint.py --shape {shape} exit {p.returncode} (logs/write_{name}.log)")
                raise SystemExit(self.table())
        have = [d for d in (self.target, self.draft, self.small) if d.is_dir()]
        size = sum(f.stat().st_size for d in have for f in d.iterdir()) / 2**30
        rng = random.Random(0)
        # Each prompt its own length to generate, so rows end at different passes and the
        # refill row's joins happen (with the random draft every proposal is rejected: rows of
        # one length would all end together).
        lines = [{"prompt": " ".join(f"w{rng.randrange(3, 32000)}" for _ in range(rng.randrange(32, 480))),
                  "max_tokens": rng.randrange(max(self.max_tokens // 4, 1), self.max_tokens + 1)}
                 for _ in range(self.n)]
        self.prompts = self.work / "prompts.jsonl"
        self.prompts.write_text("".join(json.dumps(x) + "\n" for x in lines))
        self.row("write checkpoints", True, time.perf_counter() - self.t_write,
                 f"{', '.join(d.name for d in have) or 'none needed'} (Mixtral-8x7B and Mistral-7B shapes), "
                 f"{size:.1f} GiB on disk")

    def outputs(self, path: Path) -> dict[int, dict]:
        """index -> the JSONL record (token_ids; logprobs where the run was asked for them)."""
        if not path.is_file():
            return {}
        return {r["index"]: r for r in map(json.loads, path.read_text().splitlines())}

    def same(self, got: dict, ref: dict, exact: bool = False) -> tuple[bool, str]:
        """Greedy output against the reference run's (plain decoding). exact (fp32): every token
        equal. bf16: on these random weights the next-token distribution is nearly flat (the
        top three within ~0.1 nats, logits in steps of 0.03), and a router that flips a token's
        expert pair under rounding moves it by tenths of a nat, so outputs part
        (docs/results/bf16_router_s11); the row asserts that where its outputs still agree with
        plain decoding, the 90th percentile of the per-position drift is rounding-sized
        (near_ties.TYPICAL_CAP), and its note counts equal outputs and swaps of plain's top two."""
        from specoffload.near_ties import TYPICAL_CAP, Sequence, judge, logprob_lists

        if len(ref) != self.n:  # no plain run to compare with: nothing is shown equal
            return False, f"{len(got)}/{self.n} outputs, no plain decoding to compare with"
        if len(got) != self.n:
            return False, f"{len(got)}/{self.n} outputs"
        v = judge([Sequence(got[i]["token_ids"], r["token_ids"], logprob_lists(got[i].get("logprobs")),
                            logprob_lists(r.get("logprobs"))) for i, r in sorted(ref.items())])
        note = f"{v.equal}/{self.n} equal to plain, drift 90th percentile {v.typical:.3f} and max {v.drift:.3f} nats"
        if v.ties:
            note += f", {len(v.ties)} first differ at a swap of plain's top 2"
        others = [b for b in v.bad if b.startswith("sequence")]
        if others:
            note += f", {len(others)} otherwise ({others[0]})"
        return (v.equal == self.n) if exact else v.typical <= TYPICAL_CAP, note

    def reference(self) -> dict:
        """Plain decoding's outputs, once its row (running beside this one) has finished."""
        return self.plain.get()

    @staticmethod
    def figures(out: str) -> str:
        """The run's own summary: tokens/s, acceptance, GPU peak, and the plan auto line."""
        keep = [ln.split("error: ")[-1] for ln in out.splitlines()
                if re.search(r"tok/s\)|specoffload: error|^plan auto|started in", ln)]
        return "; ".join(keep)[-600:]

    def generate(self, name: str, out_name: str, *flags, env=None, ref: "bool | Outputs" = True, model=None,
                 exact: bool = False):
        """ref: compare with plain decoding (True), with another row's outputs, or not (False);
        exact: every token equal (see `same`). A run with --refill must say it refilled rows."""
        out = self.work / f"{out_name}.jsonl"
        out.unlink(missing_ok=True)
        rc, text, dt = self.run(name, self.cli("generate", "--model", model or self.target, "--prompts", self.prompts,
                                               "--max-tokens", self.max_tokens, "--ignore-eos", "--out", out,
                                               "--gpu-memory", CAP, "--quiet", "--logprobs", 2, *flags),
                                env=env or self.env_local)
        got = self.outputs(out)
        if out.is_file():  # beside the log, for a look at where runs part
            shutil.copy(out, self.logs / out.name)
        ok, note = (len(got) == self.n, f"{len(got)}/{self.n} outputs") if ref is False else self.same(
            got, ref.get() if isinstance(ref, Outputs) else self.reference(), exact)
        refilled = "--refill" not in flags or "rows refilled" in text
        # with GPU rows, rows that join must take the GPU rows finished ones freed
        gpu_joined = "--gpu-kv-rows" not in flags or "rows into GPU rows" in text
        self.row(name, rc == 0 and ok and refilled and gpu_joined, dt,
                 f"rc {rc}, {note}{'' if refilled else ', no request refilled'}"
                 f"{'' if gpu_joined else ', no joining row took a GPU row'}; {self.figures(text)}")
        return got

    def disk_tier(self):
        """The disk tier's CUDA path (issue 18): the target's last half of layers read from the
        checkpoint every pass (a plan file; `placement/host_fit.py` picks this when host memory is
        short) against plain decoding with every layer in host memory. The same bytes reach the
        same kernels at the same batch, so every token must be equal. The files were just written,
        so the reads come from the page cache: this shows the path, not a disk's speed."""
        n = self.target_layers
        disk = list(range(n - n // 2, n))
        plan = self.work / "plan_disk.json"
        plan.write_text(json.dumps({"device": "cuda", "gpu_memory": 24 * 2**30, "disk_layers": disk}))
        self.generate(f"generate, target layers {disk[0]}-{disk[-1]} read from disk each pass (every token equal)",
                      "disk", "--plan", plan, exact=True)

    def lossless(self) -> list:
        """Lossless where the arithmetic allows the claim: a 2-layer Mixtral-8x7B-shaped target in
        fp32 (rounding near 1e-6, far under its top-2 gaps) decoded plainly, then speculatively
        (self:1 draft, so proposals are accepted too) with rows refilled at half the batch, a
        quarter of it attending on the GPU (rows that join take those freed): every token
        equal. (Session 11 also ran bf16 plain decoding of it at batch 8 against 16: 16/16
        equal, drift 0.031 nats; docs/results/gpu_check_s11.) Two rows side by side, the second
        compared once the first has finished."""
        m, half, ref = self.small, max(self.n // 2, 1), Outputs()

        def plain32():
            with ref.setting():
                ref.value = self.generate("lossless: generate --dtype float32 (no draft)", "plain32", "--dtype",
                                          "float32", model=m, ref=False)

        def spec32():
            rows = max(half // 2, 1)  # GPU rows, which joining rows take once their sequences finish
            self.generate(f"lossless: --dtype float32 --draft self:1 -k 3 --refill at batch {half}, {rows} GPU KV rows "
                          "(every token equal)", "spec32", "--dtype", "float32", "--draft", "self:1", "-k", 3,
                          "--schedule", "single", "--batch-size", half, "--refill", "--gpu-kv-rows", rows,
                          model=m, ref=ref, exact=True)
        return [("plain32", plain32), ("spec32", spec32)]

    def ray_head(self):
        """`ray start --head` with its dashboard, for the Ray job row."""
        rc, text, dt = self.run("ray start", [*RAY, "start", "--head", "--dashboard-host", "127.0.0.1",
                                              "--object-store-memory", str(4 * 2**30), "--disable-usage-stats"], 120)
        dash = self.dashboard_up()
        self.row("ray start --head", rc == 0 and dash, dt, f"rc {rc}, dashboard {'up' if dash else 'not answering'}")

    @staticmethod
    def dashboard_up(wait: float = 60) -> bool:
        """Ray jobs go through the dashboard (port 8265); without ray[default]'s extras it never starts."""
        import urllib.request
        end = time.monotonic() + wait
        while time.monotonic() < end:
            try:
                with urllib.request.urlopen("http://127.0.0.1:8265/api/version", timeout=5):
                    return True
            except OSError:
                time.sleep(2)
        return False

    def llm_api(self):
        code = f"""
import json
from specoffload import LLM, SamplingParams
from specoffload.cli import encode_prompts, result_record
lines = [json.loads(x) for x in open({str(self.prompts)!r})]
with LLM({str(self.target)!r}, draft={str(self.draft)!r}, draft_fp8=True, k=4, draft_window=64, draft_sinks=4,
         gpu_memory={CAP!r}, progress=False) as llm:
    ids = encode_prompts(llm.tokenizer, [x["prompt"] for x in lines], chat=True)  # as the CLI
    outs = llm.generate(ids, [SamplingParams(max_tokens=x["max_tokens"], ignore_eos=True, logprobs=2) for x in lines])
    print("stats:", json.dumps({{k: llm.last_stats.get(k) for k in ("tokens_per_s", "acceptance")}}))
with open({str(self.work / "api.jsonl")!r}, "w") as f:
    for i, (x, o) in enumerate(zip(lines, outs)):
        f.write(json.dumps(result_record(i, x["prompt"], o)) + "\\n")
"""
        rc, text, dt = self.run("python LLM API", [sys.executable, "-c", code], env=self.env_local)
        ok, note = self.same(self.outputs(self.work / "api.jsonl"), self.reference())
        chosen = " ".join(ln for ln in text.splitlines() if ln.startswith("stats"))
        self.row("python LLM API (fp8 draft, W64)", rc == 0 and ok, dt, f"rc {rc}, {note}; {chosen[-300:]}")

    def restart(self):
        """The GPU executor's process SIGKILLed once the first request has finished (issue 22): the
        driver starts a fresh actor set and carries on with what had not finished, these greedy
        requests from the tokens they had (actors/supervisor.py); every request comes back once,
        as plain decoding (the bf16 rule of `same`: the rest of the run has a smaller batch, and
        a continued request's KV is rebuilt by a prefill). The note says how many continued."""
        code = f"""
import json, os, signal
from specoffload import LLM, SamplingParams
from specoffload.actors.supervisor import actor_pids
from specoffload.cli import encode_prompts, result_record
lines = [json.loads(x) for x in open({str(self.prompts)!r})]
with LLM({str(self.target)!r}, gpu_memory={CAP!r}, progress=False) as llm:
    first = llm.run_id
    pid = actor_pids(first)["gpu_executor"]
    seen = []
    def on_output(o):
        seen.append(o.request_id)
        if len(seen) == 1:
            os.kill(pid, signal.SIGKILL)
    ids = encode_prompts(llm.tokenizer, [x["prompt"] for x in lines], chat=True)
    outs = llm.generate(ids, [SamplingParams(max_tokens=x["max_tokens"], ignore_eos=True, logprobs=2) for x in lines],
                        on_output=on_output)
    print("restart:", json.dumps({{"restarts": llm.last_stats["restarts"], "new_run": llm.run_id != first,
                                   "each_once": sorted(seen) == sorted(o.request_id for o in outs),
                                   "continued": llm.last_stats.get("continued")}}))
with open({str(self.work / "restart.jsonl")!r}, "w") as f:
    for i, (x, o) in enumerate(zip(lines, outs)):
        f.write(json.dumps(result_record(i, x["prompt"], o)) + "\\n")
"""
        rc, text, dt = self.run("restart", [sys.executable, "-c", code], env=self.env_local)
        ok, note = self.same(self.outputs(self.work / "restart.jsonl"), self.reference())
        said = [ln for ln in text.splitlines() if ln.startswith("restart:")]
        stats = json.loads(said[0][8:]) if said else {}
        held = {k: stats.get(k) for k in ("restarts", "new_run", "each_once")} == {
            "restarts": 1, "new_run": True, "each_once": True}
        self.row("executor SIGKILLed mid-run (python LLM API)", rc == 0 and ok and held, dt,
                 f"rc {rc}, {json.dumps(stats) if said else 'no restart line'}, {note}")

    def ray_job(self):
        out = self.work / "job.jsonl"
        out.unlink(missing_ok=True)
        self.head_ready.wait()
        rc, text, dt = self.run("ray job", [*RAY, "job", "submit", "--address", "http://127.0.0.1:8265",
                                            "--working-dir", "scripts", "--", sys.executable, "generate_job.py",
                                            "--model", self.target, "--prompts", self.prompts, "--max-tokens",
                                            self.max_tokens, "--ignore-eos", "--gpu-memory", CAP, "--logprobs", 2,
                                            "--out", out], env=self.head_env)
        ok, note = self.same(self.outputs(out), self.reference())
        self.row("ray job submit (generate_job.py)", rc == 0 and ok, dt, f"rc {rc}, {note}")

    def plan(self):
        rc, text, dt = self.run("plan", self.cli("plan", "--model", self.target, "--draft", self.draft,
                                                 "--gpu-memory", CAP, "--prompt-len", 512, "--gen", 128,
                                                 "--requests", 192, "--acceptance", 0.8,
                                                 "--save-hardware", self.logs / "hardware.json"), env=self.env_local)
        best = [ln for ln in text.splitlines() if "best" in ln.lower() or "chose" in ln.lower()]
        # The CPU attention rates it measured: the figures the layer chain's cost is priced by.
        cpu = re.search(r"CPU attention [\d.]+ GB/s \+ [\d.]+ GFLOP/s", text)
        self.row("specoffload plan", rc == 0, dt, f"rc {rc}; {' '.join(best)[-300:]}"
                                                  f"{'; ' + cpu.group(0) if cpu else ''}")

    def bench_row(self, name: str, *flags):
        """A short `bench --workload w1-small` (constructed weights: 2 target and 4 draft layers).
        With its warm-up: on CUDA the prefill's fused groups compile there (plan.fused_prefill),
        not inside the first timed run (session 41's fp8 row: 8.37 s of a 10 s run)."""
        rc, text, dt = self.run(name, self.cli(
            "bench", "--workload", "w1-small", "--target-layers", 2, "--draft-layers", 4, "--batch", 64,
            "--gen", 12, "--prompt-len", 256, "--modes", "none,single", *flags),
            timeout=420, env=self.env_local)
        modes = [ln for ln in text.splitlines() if re.match(r"^(none|single)\S*\s+\d", ln)]
        self.row(name, rc == 0 and len(modes) >= 2, dt, f"rc {rc}; " + " | ".join(" ".join(m.split()[:4]) for m in modes))

    def bench(self):
        # the host KV cache in huge pages and not (plan.kv_huge_pages), both on the device's host
        self.bench_row("bench --workload w1-small (2+4 layers) --kv-huge-pages 1,0", "--kv-huge-pages", "1,0",
                       "--json", self.logs / "bench.json")

    def bench_job(self):
        """A job whose rows are refilled many times (`bench --workload w1-long-tiny`, 96 requests
        at batch 4) while the weight copier streams: joining rows take the draft cache's rows
        that finished ones left (the captured step keeps serving; since 8bbbc62), and a batch
        down to half its rows is compacted and its step captured again. Until 8bbbc62 every join
        recaptured (~70 a run); session 33's w1-long failed after ~30 captures (torch's stream
        pool came round to the copier's stream, models/cuda_streams.py), which
        tests/test_cuda_streams.py now covers with 96."""
        out = self.logs / "bench_job.json"
        rc, text, dt = self.run("bench job", self.cli(
            "bench", "--workload", "w1-long-tiny", "--requests", JOB_REQUESTS, "--modes", "single@2",
            "--draft-window", 8, "--no-warmup", "--json", out), timeout=420, env=self.env_local)
        try:
            r = json.loads(out.read_text())["results"][0]
        except (OSError, ValueError, KeyError, IndexError):
            r = {}
        joins, graphs = r.get("joins", 0), r.get("draft_graph_steps", 0)
        self.row(f"bench --workload w1-long-tiny ({JOB_REQUESTS} requests at batch 4, rows refilled, draft graphed)",
                 rc == 0 and joins >= JOB_JOINS and graphs > 0, dt,
                 f"rc {rc}; {joins} joins, {graphs} draft steps through graphs, {r.get('tokens_per_s')} tok/s")

    def fp8(self) -> list:
        """The target quantized to fp8 as it loads: plain, then speculative against that plain
        (the fp8 target's own output); side by side, compared once plain has finished."""
        ref = Outputs()

        def plain():
            with ref.setting():
                ref.value = self.generate("generate --quantize fp8 (no draft)", "plain_fp8", "--quantize", "fp8",
                                          ref=False)
        return [("plain_fp8", plain),
                ("auto_q8", lambda: self.generate("generate --quantize fp8 --draft --plan auto", "auto_q8",
                                                  "--quantize", "fp8", "--draft", self.draft, "--plan", "auto",
                                                  ref=ref))]

    def bench_fp8(self):
        """With the prefill's elementwise work fused and not (plan.fused_prefill): triton compiles
        it on the device, and both ways run (4 short runs)."""
        self.bench_row("bench --workload w1-small --target-fp8 --fused-prefill 1,0", "--target-fp8",
                       "--fused-prefill", "1,0", "--json", self.logs / "bench_fp8.json")

    def families(self, part: int, of: int):
        rc, text, dt = self.run(f"tiny families {part + 1}/{of}", [
            sys.executable, str(REPO / "scripts" / "gpu_check_families.py"), "--part", f"{part + 1}/{of}"],
            env=self.env_local)
        lines = [ln for ln in text.splitlines() if ln.startswith("family")]
        self.row(f"tiny families on the GPU, part {part + 1} of {of} (actors vs transformers)", rc == 0 and lines, dt,
                 f"rc {rc}; " + " | ".join(lines)[-400:])

    def cuda_tests(self, group: str, args: list[str]):
        rc, text, dt = self.run(f"cuda tests: {group}", [
            sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "-rfE", "--durations=5",
            # a hung test prints every thread's stack before the step's timeout
            "-o", "faulthandler_timeout=90", *args], timeout=400, env=self.env_local)
        tail = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", ln)]
        # pytest's exit 5: this group selected no test (the others hold them all)
        self.row(f"CUDA-only tests: {group} (pytest -m cuda)", rc in (0, 5), dt,
                 (tail[-1] if tail else f"rc {rc}").strip("= "))

    def machine(self):
        """What the runs share: the card, host memory, /dev/shm (the loaders' weights), and how
        the executor tells its own CUDA context from other processes' memory (GpuBudget)."""
        code = ("import os, shutil, torch\n"
                "from specoffload.actors.gpu_budget import GpuBudget\n"
                "from specoffload.host_facts import cpu_model\n"
                "b = GpuBudget(torch.device('cuda'), 24 << 30)\n"
                "mem = dict(ln.split(':', 1) for ln in open('/proc/meminfo'))\n"
                "print(f'machine: {torch.cuda.get_device_name()}, {os.cpu_count()} cores ({cpu_model()}), MemTotal '\n"
                "      f'{int(mem[\"MemTotal\"].split()[0]) >> 20} GiB, /dev/shm {shutil.disk_usage(\"/dev/shm\").total >> 30} GiB; '\n"
                "      f'CUDA context {b.context / 2**30:.2f} GiB from {b.context_source}, others {b.others / 2**30:.2f} GiB')\n")
        rc, text, dt = self.run("machine", [sys.executable, "-c", code], 60)
        line = [ln for ln in text.splitlines() if ln.startswith("machine:")]
        self.row("machine", rc == 0 and bool(line), dt, line[0][9:] if line else text.strip()[-300:])

    # -- all -----------------------------------------------------------------------------------
    def main(self, steps: set) -> int:
        """Everything side by side that can be: the CUDA tests (three processes) and the
        checkpoint writers from the start, `ray start` meanwhile; then the engine runs in ORDER,
        --jobs at a time while the tests run and one more after, each with a Ray cluster of its
        own and the 24 GiB cap (so that four fit the card beside the tests)."""
        background = []
        engine = steps - {"tests"}
        if engine:  # a Ray left from an earlier check; never later: it stops every Ray on the machine
            self.run("ray stop (before)", [*RAY, "stop", "--force"], 60)
        self.machine()

        def guarded(f, *a):
            """A step that raises is a failed row, not a check without its table."""
            try:
                f(*a)
            except Exception as e:  # noqa: BLE001 - reported in the table
                self.row(f"{getattr(f, '__name__', 'step')} (raised)", False, 0, f"{type(e).__name__}: {e}"[-300:])

        def spawn(f, *a):
            t = threading.Thread(target=guarded, args=(f, *a), daemon=True)
            t.start()
            background.append(t)

        if "tests" in steps:  # they start Ray of their own and need no checkpoint
            for group, args in TEST_GROUPS:
                spawn(self.cuda_tests, group, args)
        tests = list(background)
        self.head_ready = threading.Event()
        if engine:
            procs = self.start_checkpoints(steps)
            if "job" in steps:
                def head():
                    try:
                        self.ray_head()
                    finally:
                        self.head_ready.set()
                spawn(head)
            self.write_checkpoints(procs)
            # The disk step alone runs its own plain decoding unless given one (--plain): its
            # target may be deeper than an earlier call's (--target-layers).
            own_plain = "generate" in steps or ("disk" in steps and self.plain_file is None)
            if not own_plain:  # a later call compares with the plain run an earlier one wrote (--plain)
                with self.plain.setting():
                    self.plain.value = self.outputs(self.plain_file or self.work / "plain.jsonl")
            if "plan" in steps:  # no engine: beside the pool
                spawn(self.plan)
            rows = {}
            if own_plain:
                def plain():
                    with self.plain.setting():
                        self.plain.value = self.generate("generate (no draft)", "plain", ref=False)
                rows["plain"] = plain
            if "generate" in steps:
                d, half = ["--draft", self.draft], max(self.n // 2, 1)
                rows["auto"] = lambda: self.generate("generate --draft --plan auto", "auto", *d, "--plan", "auto")
                rows["autofp8"] = lambda: self.generate("generate --draft --draft-fp8 --plan auto", "auto_fp8", *d,
                                                        "--draft-fp8", "--plan", "auto")
                # half the prompts per batch, with --refill: rows refilled in place
                rows["hand"] = lambda: self.generate(f"generate --draft (bf16, flags by hand, --refill at batch {half})",
                                                     "hand", *d, "--schedule", "single", "-k", 4, "--draft-window", 64,
                                                     "--draft-sinks", 4, "--batch-size", half, "--refill")
            if "disk" in steps:
                rows["disk"] = self.disk_tier
            for step, row, f in (("api", "api", self.llm_api), ("job", "job", self.ray_job),
                                 ("restart", "restart", self.restart), ("bench", "bench", self.bench),
                                 ("bench", "bench_job", self.bench_job),
                                 ("fp8", "bench_fp8", self.bench_fp8)):
                if step in steps:
                    rows[row] = f
            for step, f in (("lossless", self.lossless), ("fp8", self.fp8)):
                if step in steps:
                    rows.update(f())
            if "families" in steps:
                rows.update({f"families{i + 1}": (lambda i=i: self.families(i, 2)) for i in range(2)})
            # One more engine run at a time once the CUDA tests' processes have left the card
            # and the cores (without them the pool stays at --jobs: the disk step's deep target
            # fills host memory).
            more = threading.Event()
            if tests:
                spawn(lambda: ([t.join() for t in tests], more.set()))
            self.pool([rows[k] for k in ORDER if k in rows], more, guarded)
        for t in background:
            t.join()
        if engine:
            self.run("ray stop", [*RAY, "stop", "--force"], 60, always=True)
        return self.table()

    def pool(self, tasks: list, more: threading.Event, guarded):
        """The rows, --jobs at a time in the order given, and one more at a time once `more` is
        set; a worker takes the next row as it frees."""
        todo = queue.SimpleQueue()
        for t in tasks:
            todo.put(t)

        def worker(gate: threading.Event | None):
            if gate is not None:
                gate.wait()
            while True:
                try:
                    task = todo.get_nowait()
                except queue.Empty:
                    return
                guarded(task)

        workers = [threading.Thread(target=worker, args=(None,), daemon=True) for _ in range(self.jobs)]
        workers.append(threading.Thread(target=worker, args=(more,), daemon=True))
        for w in workers:
            w.start()
        for w in workers[:-1]:
            w.join()
        more.set()  # the queue is empty: the last worker, if it never started, finds it so
        workers[-1].join()

    def table(self) -> int:
        """One line per row, in the order they started (side by side: `from` is when, in seconds)."""
        rows = sorted(self.rows, key=lambda r: r[4])
        w = max(len(r[0]) for r in rows)
        lines = [f"{'check':<{w}}  result   from  seconds  notes", "-" * (w + 48)]
        lines += [f"{n:<{w}}  {'PASS' if ok else 'FAIL':<6}  {t:5.0f}  {s:7.0f}  {note}" for n, ok, s, note, t in rows]
        failed = sum(not r[1] for r in rows)
        lines.append(f"{len(rows) - failed}/{len(rows)} passed in {time.perf_counter() - self.t_begin:.0f} s "
                     f"({self.jobs} engine runs at a time, {self.jobs + 1} once the CUDA tests were done)")
        text = "\n".join(lines)
        (self.logs / "table.txt").write_text(text + "\n")
        print("\n" + text)
        return 1 if failed else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Run what users run on a GPU and print one table of results.")
    ap.add_argument("--work", default="/tmp/specoffload-gpucheck",
                    help="folder for the checkpoints and outputs (kept between runs; checkpoints are reused).")
    ap.add_argument("--logs", default="gpu_check_logs", help="folder for the steps' full log (steps.log) and the table (table.txt).")
    # With 4 layers (11.8 GB) and 16 prompts of up to 480 tokens and 32 new, the planner picks
    # speculation with an fp8 draft, every target layer streamed, as with the 8 layers
    # (`plan --hardware configs/hardware/h200_measured.json`, 2026-12-02), at half the bytes to
    # write and load, so that four runs fit host memory side by side.
    ap.add_argument("--prompts", type=int, default=16, help="prompts per generate run (default 16).")
    ap.add_argument("--max-tokens", type=int, default=32,
                    help="the most tokens generated per prompt; each prompt asks for between a quarter of it and "
                         "all of it (default 32).")
    ap.add_argument("--target-layers", type=int, default=4, help="layers of the Mixtral-shaped target (default 4).")
    ap.add_argument("--jobs", type=int, default=4,
                    help="engine runs side by side while the CUDA tests run, one more once they are done (default 4: "
                         "four 24 GiB caps and the CUDA tests fit an 80 GiB card's worth of the H200, five copies "
                         "of the 4-layer target its host memory).")
    ap.add_argument("--steps", default=",".join(STEPS),
                    help=f"comma list of steps to run (default all: {','.join(STEPS)}). The check can be split over "
                         "several calls on one machine: the checkpoints and the plain run's outputs in --work are "
                         "reused by later calls.")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="seconds after which no further step starts and a running one is stopped, so a call "
                         "with a hard limit still ends with its table (rows not run say skipped); default none.")
    ap.add_argument("--plain", type=Path, default=None,
                    help="plain decoding's JSONL (plain.jsonl in an earlier call's --logs) for the steps that compare "
                         "with it when this call does not run the generate step. The checkpoints and prompts are "
                         "seeded, so a fresh machine with the same torch writes the same ones.")
    a = ap.parse_args(argv)
    steps = set(filter(None, a.steps.split(",")))
    if steps - set(STEPS):
        ap.error(f"unknown steps {sorted(steps - set(STEPS))}; the steps are {','.join(STEPS)}")
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device visible; this check is for a GPU machine", file=sys.stderr)
        return 2
    work, logs = Path(a.work), Path(a.logs)
    work.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    return Check(work, logs, a.prompts, a.max_tokens, a.target_layers, a.time_limit, a.plain, a.jobs).main(steps)


if __name__ == "__main__":
    sys.exit(main())
