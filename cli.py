"""`specoffload` command line: generate text, plan a placement for this machine, or run a benchmark workload.

Errors the user can fix print one line and exit 2; results already written stay written.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
from pathlib import Path

from .errors import SpecOffloadError
from .placement.draft_kv import PLACEMENTS

BUILTIN_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give three tips for writing clear code.",
    "Explain in one sentence what a GPU is.",
]


def add_engine_options(p: argparse.ArgumentParser):
    """Options that choose the model, the draft and the placement (shared with the Ray job)."""
    p.add_argument("--model", help="The local Hugging Face checkpoint folder to run, or a Hub id org/name (from "
                                   "the HF cache, downloaded unless HF_HUB_OFFLINE is set; default: the embedded "
                                   "SmolLM2-135M-Instruct, converted once into ~/.cache/specoffload).")
    p.add_argument("--draft", help="The draft model: 'self:N' for the target's first N layers, or a checkpoint "
                                   "folder or Hub id with the same tokenizer. Leave it out to decode without "
                                   "speculation.")
    p.add_argument("--schedule", choices=["none", "single", "dual"],
                   help="none decodes without speculation; single drafts, then verifies one batch; dual "
                        "verifies one batch while the draft proposes for the other (default: single with a "
                        "draft, else none).")
    p.add_argument("-k", "--draft-length", type=int, dest="k",
                   help="The number of draft tokens proposed per sequence per round (default 4, or the "
                        "planner's).")
    p.add_argument("--adaptive-k", action="store_true", default=None,
                   help="Adjust the draft length per batch from the measured acceptance (--plan auto turns "
                        "it on).")
    p.add_argument("--draft-window", type=int, help="Make the draft attend over only the last W tokens (its KV "
                                                    "cache a ring of W slots per sequence).")
    p.add_argument("--draft-sinks", type=int, help="With --draft-window, the draft also keeps the first N "
                   "tokens of each sequence in view (attention sinks).")
    p.add_argument("--draft-kv-fp8", action="store_true", help="Store the windowed draft's KV cache in fp8.")
    p.add_argument("--draft-fp8", action="store_true", help="Keep the draft checkpoint's layer matrices in fp8: "
                   "half its GPU memory; the output stays the target's, the acceptance may change.")
    p.add_argument("--quantize", choices=["fp8"], help="Quantize a bf16 target to fp8 (per output channel) as "
                   "it loads: half the bytes in host memory and per pass. fp8 checkpoints (compressed-tensors "
                   "FP8 / FP8-dynamic, block-wise fp8) load as fp8 without it.")
    p.add_argument("--draft-kv", choices=tuple(PLACEMENTS),
                   help="Where the draft's KV cache lives. " + "; ".join(f"{k}: {v}" for k, v in PLACEMENTS.items())
                   + ".")
    p.add_argument("--batch-size", type=int, help="The number of sequences per batch (default 64).")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="Where the executor computes (default: cuda if this machine has a GPU).")
    p.add_argument("--gpu-memory", help="Cap the executor's GPU memory, e.g. 24GiB; allocations past it fail.")
    p.add_argument("--micro-batches", type=int, help="Split each target pass into this many micro-batches, so "
                   "CPU attention of one overlaps GPU work of another (default: the plan's, 1).")
    p.add_argument("--gpu-kv-rows", type=int, help="The first N rows of each batch keep their target KV cache in "
                   "GPU memory and attend there, beside the CPU's attention for the rest (default: the plan's, 0).")
    p.add_argument("--refill", action=argparse.BooleanOptionalAction, default=None,
                   help="With more prompts than --batch-size, waiting prompts take the rows of finished "
                   "ones in the running batch (their prefill rides the next target pass), so the batch "
                   "stays full; --no-refill runs waves, each waiting for its slowest sequence. Default: "
                   "--plan auto's choice (on where prompts outnumber rows), else off (placement/refill.py).")
    p.add_argument("--plan", help="A placement plan JSON file (see configs/, or write one with `specoffload "
                                  "plan`), or 'auto' to measure this machine and let the planner choose the "
                                  "placement, batch size, schedule and draft settings for these prompts.")
    p.add_argument("--acceptance", type=float, default=0.7,
                   help="With --plan auto, the draft's expected per-token acceptance (default 0.7).")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="The compute dtype (default: the checkpoint's).")
    p.add_argument("--engine", choices=["ray", "reference"], default="ray",
                   help="ray runs the four Ray actors (default); reference runs the plain in-process path.")
    p.add_argument("--ray-address", help="The Ray cluster to join, or 'local' to start one for this run. By "
                   "default the cluster RAY_ADDRESS names, else the one the last `ray start` on this machine "
                   "recorded, else a new local one.")
    p.add_argument("--no-dashboard", dest="dashboard", action="store_false", default=None,
                   help="Start a local Ray cluster without its dashboard (by default it serves on "
                        "127.0.0.1; SPECOFFLOAD_DASHBOARD=0 does the same).")


def add_generate_options(p: argparse.ArgumentParser):
    """`specoffload generate`'s options (shared with the Ray job, scripts/generate_job.py)."""
    p.add_argument("--prompt", action="append", default=[], help="A prompt; repeat the option for more.")
    p.add_argument("--prompts", help="A file of prompts: plain text, one per line, or JSONL with a 'prompt' "
                                     "field (and, if wanted, its own 'max_tokens').")
    p.add_argument("--out", help="Write the results here as JSONL, one line per request as it finishes.")
    p.add_argument("--max-tokens", type=int, default=64, help="The most tokens to generate per prompt "
                                                              "(default 64).")
    p.add_argument("--temperature", type=float, default=0.0, help="The sampling temperature; 0 (the default) "
                                                                  "is greedy decoding.")
    p.add_argument("--top-p", type=float, default=1.0, help="Sample from the smallest set of tokens whose "
                   "probabilities sum to at least this (nucleus sampling; default 1.0, every token).")
    p.add_argument("--top-k", type=int, default=-1, help="Sample from only the k most likely tokens (default "
                   "-1, no limit).")
    p.add_argument("--seed", type=int, help="The sampling seed; request i uses seed + i.")
    p.add_argument("--ignore-eos", action="store_true", help="Do not stop at end-of-sequence tokens.")
    p.add_argument("--logprobs", type=int, help="Write the target's N most likely tokens and their log "
                   "probabilities for every generated token (and the chosen one's) into --out's lines.")
    p.add_argument("--no-chat-template", action="store_true",
                   help="Send the prompts as raw text even if the tokenizer has a chat template.")
    p.add_argument("--quiet", action="store_true", help="Show no progress bar.")
    p.add_argument("--trace", help="Write a Chrome-trace JSON timeline of the stage spans (weight copy, CPU "
                                   "attention, GPU target, draft) per layer and batch here; see "
                                   "scripts/plot_timeline.py.")
    add_engine_options(p)


def _build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="specoffload", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="Generate text for prompts; `specoffload generate --help` lists its "
                                        "options.",
                       description="Generate completions. With no prompts, it runs a few built-in ones.")
    add_generate_options(g)
    from .run_batch import add_parser as add_run_batch

    add_run_batch(sub, add_engine_options)
    sub.add_parser("bench", add_help=False,
                   help="Run a benchmark workload (W1 shapes) and print tokens/s against no speculation; "
                        "`specoffload bench --help` lists its options.")
    sub.add_parser("plan", add_help=False,
                   help="Measure this machine and choose the placement, batch size, schedule and draft "
                        "settings; `specoffload plan --help` lists its options.")
    return ap


def llm_from_args(args, progress: bool, trace: bool = False, workload=None, start: bool = True):
    """An LLM from the options of `add_engine_options` (`workload`: what --plan auto plans for;
    start=False: checked, not started, see LLM)."""
    from .configs.engine_args import EngineArgs
    from .llm import LLM

    return LLM(args.model, draft=args.draft, plan=args.plan, start=start,
               engine_args=EngineArgs.from_cli(args, trace=trace, progress=progress, workload=workload))


def read_prompts(path: str) -> list[tuple[str, dict]]:
    """(prompt, its own options) per prompt of the file; a JSONL line may set `max_tokens`
    for its prompt (over --max-tokens)."""
    from .errors import ConfigError

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"prompts file not found: {p}" if not p.exists() else f"prompts file {p} is not a file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read prompts file {p}: {e.strerror}") from None

    def line_of(offset: int) -> int:
        return data.count(b"\n", 0, offset) + 1

    if b"\0" in data:  # text never holds NUL: a binary file given by mistake
        raise ConfigError(f"{p}:{line_of(data.index(0))}: NUL byte: not a text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}:{line_of(e.start)}: not UTF-8 text (byte 0x{data[e.start]:02x}); "
                          f"convert it, e.g. iconv -t utf-8") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{p}:{n}: not valid JSON ({e.msg})") from None
            if "prompt" not in rec:
                raise ConfigError(f"{p}:{n}: JSON line has no 'prompt' field")
            if not isinstance(rec["prompt"], str):
                raise ConfigError(f"{p}:{n}: 'prompt' must be a string, got {type(rec['prompt']).__name__}")
            opts = {}
            if "max_tokens" in rec:
                m = rec["max_tokens"]
                if not isinstance(m, int) or isinstance(m, bool) or m < 1:
                    raise ConfigError(f"{p}:{n}: 'max_tokens' must be a positive integer, got {m!r}")
                opts["max_tokens"] = m
            out.append((rec["prompt"], opts))
        else:
            out.append((line, {}))
    if not out:
        raise ConfigError(f"{p}: no prompts")
    return out


def collect_prompts(prompt: list, prompts_file: str | None) -> list[tuple[str, dict]]:
    """--prompt values, then the --prompts file's; the built-in prompts if neither is given;
    each with its own options (read_prompts)."""
    lines = [(p, {}) for p in prompt]
    if prompts_file:
        lines += read_prompts(prompts_file)
    return lines or [(p, {}) for p in BUILTIN_PROMPTS]


def encode_prompts(tokenizer, prompts: list[str], chat: bool) -> list[dict]:
    """Token-id prompts, wrapped in the tokenizer's chat template when it has one and `chat`."""
    if chat and getattr(tokenizer, "chat_template", None):
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in prompts]
    return [{"prompt_token_ids": tokenizer(t, add_special_tokens=False)["input_ids"]} for t in prompts]


def result_record(index: int, prompt: str, o) -> dict:
    """One JSONL line of results for a finished request."""
    c = o.outputs[0]
    rec = {"index": index, "prompt": prompt, "text": c.text, "token_ids": c.token_ids,
           "finish_reason": c.finish_reason, "metrics": o.metrics}
    if c.logprobs is not None:  # per token: {token id: log probability}, the chosen one first
        rec["logprobs"] = [{str(t): lp.logprob for t, lp in d.items()} for d in c.logprobs]
    return rec


def open_results(path: str | None, prompts: list[str], params: list, model, chat: bool, prog: str = "specoffload"):
    """--out as a resumable journal (results_journal.py): lines already there for these prompts
    and parameters are kept and their requests skipped; None without --out."""
    from .results_journal import open_journal, request_key

    if not path:
        return None
    salt = json.dumps({"model": str(Path(model).resolve()) if model else "default", "chat": chat})
    journal = open_journal(path, [request_key(p, sp, salt) for p, sp in zip(prompts, params)])
    if journal.torn:
        print(f"{prog}: {path}: dropped a torn last line ({journal.torn} bytes, a run killed mid-write); "
              f"that request runs again", file=sys.stderr)
    if journal.done:
        print(f"{prog}: resuming: {len(journal.done)} of {len(prompts)} requests already in {path}, "
              f"{len(journal.pending())} to run", file=sys.stderr)
    return journal


def generate_writing(llm, prompts: list[str], inputs: list[dict], params, out_f, indices=None):
    """llm.generate, each result written to out_f (if any) as a JSONL line as its request finishes.
    out_f: a file, or a results_journal.Journal (then `indices` are the requests' places in the
    whole prompt list, for resuming)."""
    from .results_journal import Journal

    first_rid = llm._next_rid

    def write(o):
        j = int(o.request_id) - first_rid
        i = indices[j] if indices is not None else j
        if isinstance(out_f, Journal):
            out_f.append(i, result_record(i, prompts[j], o))
        elif out_f:
            out_f.write(json.dumps(result_record(i, prompts[j], o)) + "\n")
            out_f.flush()

    return llm.generate(inputs, params, on_output=write)


class numbered_as:
    """Errors that name "prompt j" of a resumed run's remaining prompts name it as the user
    counts, in the whole list (prompt todo[j])."""

    def __init__(self, todo: list[int], total: int):
        self.todo, self.total = todo, total

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if isinstance(e, SpecOffloadError) and self.todo != list(range(self.total)):
            m = re.match(r"prompt (\d+)\b", str(e))
            if m and int(m.group(1)) < len(self.todo):
                e.args = (f"prompt {self.todo[int(m.group(1))]}{str(e)[m.end():]}",)
        return False


def auto_workload(args, prompts: list[str], max_tokens: int):
    """What `--plan auto` plans for: these prompts' longest length in tokens, their count, the
    most tokens any of them asks for."""
    from .llm import load_tokenizer
    from .placement.planner import Workload

    model = args.model
    if model is None:
        from .sources.default_model import default_model_dir

        model = default_model_dir()
    from .sources.hub import resolve_model

    tok = load_tokenizer(resolve_model(model))
    lens = [len(i["prompt_token_ids"]) for i in encode_prompts(tok, prompts, chat=not args.no_chat_template)]
    return Workload(max(lens), max_tokens, len(prompts), args.acceptance)


def print_texts(prompts: list[str], outs):
    for p, o in zip(prompts, outs):
        print(f"### {p}\n{o.outputs[0].text.strip()}\n")


def run_generate(args, prog: str = "specoffload") -> int:
    """`specoffload generate` and the Ray job (scripts/generate_job.py): completions for the
    prompts, written to --out as JSONL as requests finish (else printed), a summary on stderr."""
    from .configs.sampling_params import SamplingParams

    lines = collect_prompts(args.prompt, args.prompts)
    prompts = [p for p, _ in lines]
    params = [SamplingParams(max_tokens=opts.get("max_tokens", args.max_tokens), temperature=args.temperature,
                             top_p=args.top_p, top_k=args.top_k, ignore_eos=args.ignore_eos, logprobs=args.logprobs,
                             seed=None if args.seed is None else args.seed + i)
              for i, (_, opts) in enumerate(lines)]
    chat = not args.no_chat_template
    # Everything checkable is checked before Ray starts and the weights load: where the
    # results go, then the model, plan and prompts (context length, host memory for the KV).
    _check_trace_path(args.trace)
    # --out is a journal (results_journal.py): a rerun keeps what is there and runs the rest.
    journal = open_results(args.out, prompts, params, args.model, chat, prog=prog)
    if journal is not None and not journal.pending():
        print(f"{prog}: all {len(prompts)} requests already in {args.out}; nothing to run", file=sys.stderr)
        return 0
    todo = journal.pending() if journal is not None else list(range(len(prompts)))
    sub, sub_params = [prompts[i] for i in todo], [params[i] for i in todo]
    try:
        workload = auto_workload(args, sub, max(p.max_tokens for p in sub_params)) if args.plan == "auto" else None
        llm = llm_from_args(args, progress=not args.quiet, trace=bool(args.trace), workload=workload, start=False)
        inputs = encode_prompts(llm.tokenizer, sub, chat=chat)
        with numbered_as(todo, len(prompts)):
            llm.check(inputs, sub_params)
        llm.start()  # joins Ray (ray_env.ensure_ray): in a Ray job, the job's cluster from RAY_ADDRESS
        _announce(llm, prog, len(sub), args.acceptance)  # after the start: a choice that did not start fell back
    except BaseException:
        if journal:
            journal.close()
        raise
    try:
        outs = generate_writing(llm, sub, inputs, sub_params, journal, indices=todo)
        if args.trace:
            Path(args.trace).write_text(json.dumps(llm.trace()))
    finally:
        if journal:
            journal.close()
        llm.shutdown()
    if not args.out:
        print_texts(prompts, outs)
    print(summary_line(prog, len(outs), llm.last_stats, args.out), file=sys.stderr, flush=True)
    return 0


def _check_trace_path(path: str | None):
    if path:
        folder = Path(path).resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            from .errors import ConfigError

            raise ConfigError(f"cannot write --trace {path}: {folder} is not a writable folder")


def _announce(llm, prog: str, n_prompts: int, acceptance: float):
    """What --plan auto chose (and the faster candidates that did not start), and the Ray run."""
    if llm.plan_choice is not None:
        b = llm.plan_choice.best
        for why in getattr(llm, "refused", []):
            print(f"plan auto: a faster candidate did not start ({why}); fell back", file=sys.stderr)
        print(f"plan auto: {b.label()}, batch {b.batch}, {b.resident} resident / {b.disk} disk layers, "
              f"{b.slots} slots, {b.gpu_bytes / 2**30:.2f} GiB GPU predicted, "
              f"{b.tokens_per_s:.1f} tok/s predicted at acceptance {acceptance}", file=sys.stderr)
    if llm.engine == "ray":
        import ray

        print(f"{prog}: {n_prompts} prompts on Ray cluster {ray.get_runtime_context().gcs_address}, engine "
              f"run id {llm.run_id} (dashboard metrics tag run={llm.run_id})", file=sys.stderr, flush=True)
        print(f"{prog}: {startup_line(llm.startup)}", file=sys.stderr, flush=True)


def startup_line(t: dict) -> str:
    """Where the start went, e.g. `started in 41.0 s: Ray 7.2 s, then side by side host weights
    9.1 s (loader up 3.0 s, read 14.2 s, write 8.3 s on 4 threads) and the executor 15.0 s
    (draft 12.2 s, ...), both done at 16.3 s`; the executor's parts are those of a tenth of a
    second or more, the loader's read and write are summed over its threads."""
    parts = ", ".join(f"{k} {v} s" for k, v in t.get("executor_parts_s", {}).items() if v >= 0.1)
    h = t.get("host_parts_s") or {}
    host = (f" (loader up {h['up']} s, read {h['read']} s, write {h['write']} s on {h['threads']} threads)"
            if h else "")
    return (f"started in {t.get('total_s')} s: Ray {t.get('ray_s')} s, then side by side host weights "
            f"{t.get('host_weights_s')} s{host} and the executor {t.get('executor_s')} s"
            + (f" ({parts})" if parts else "") + f", both done at {t.get('actors_s')} s")


def summary_line(prog: str, requests: int, s: dict, out: str | None) -> str:
    line = (f"{prog}: {requests} requests, {s.get('tokens', 0)} tokens in {s.get('seconds', 0):.2f} s "
            f"({s.get('tokens_per_s', 0)} tok/s)")
    if s.get("acceptance") is not None:
        line += f", acceptance {s['acceptance']:.2f}, {s['tokens_per_seq_pass']:.2f} tokens/sequence/pass"
    if s.get("joins"):
        line += f", rows refilled {s['joins']} times"
        if s.get("gpu_rows_joined"):  # joining rows that took freed GPU rows (plan.gpu_kv_rows)
            line += f" ({s['gpu_rows_joined']} rows into GPU rows)"
    if s.get("join_retreats"):
        line += f" ({s['join_retreats']} joins did not fit and were retried smaller)"
    g = s.get("gpu_memory")
    if g:
        line += f", GPU peak {g['peak_in_use'] / 2**30:.2f} GiB" + (f" of {g['cap'] / 2**30:.2f}" if g["cap"] else "")
    if out:
        line += f"; results in {out}"
    return line


def _stop_ray_output():
    """Ray forwards the actors' output (a loader's progress bar, say) to this terminal a moment
    late; a failed run's driver disconnects before its one line so that the line is the last
    (the actors' tracebacks are in the log it names)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            ray.shutdown()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass


def one_line_errors(prog: str, command, *args) -> int:
    """Run a command; an error prints one line and returns 2 (1 for an actor's failure, which is
    not the input's)."""
    from .errors import ActorError, SpecOffloadError

    try:
        return command(*args)
    except SpecOffloadError as e:
        e = getattr(e, "cause", None) or e  # unwrap errors raised inside a Ray actor
        _stop_ray_output()
        print(f"{prog}: error: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
        return 1 if isinstance(e, ActorError) else 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        from .ray_env import terminated

        if not terminated.is_set():
            raise
        # ray_env.exit_on_sigterm: the with/finally blocks have shut the run down on the way here
        print(f"{prog}: terminated (SIGTERM); finished requests are in the output file, if one was given",
              file=sys.stderr)
        return 128 + signal.SIGTERM


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        from .bench import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["plan"]:
        from .plan_cli import main as plan_main

        return plan_main(argv[1:])
    args = _build_parser().parse_args(argv)
    if args.cmd == "generate":
        return one_line_errors("specoffload", run_generate, args)
    if args.cmd == "run-batch":
        from .run_batch import main_args

        return one_line_errors("specoffload", main_args, args, llm_from_args)
    return 1


if __name__ == "__main__":
    sys.exit(main())
