"""Ray Jobs entrypoint: generate completions on the cluster the job runs in.

    ray job submit --address http://HEAD:8265 --working-dir scripts -- \\
        python generate_job.py --prompts prompts.jsonl --out /shared/results.jsonl

Inside a job Ray sets RAY_ADDRESS, so the driver joins the job's cluster (outside a job it
joins a running local cluster or starts one, like the `specoffload` CLI). The
`specoffload` package must be importable by the job's Python on every node (installed
there); the working dir only needs to carry this script.

Results go to --out as JSONL, one line per request as it finishes (the order requests
finish in, each line has its prompt's "index"). Problems the user can fix print one line
and exit 2.
"""

from __future__ import annotations

import argparse
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="generate_job.py", description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", help="file of prompts: plain text (one per line) or JSONL with 'prompt'")
    ap.add_argument("--prompt", action="append", default=[],
                    help="a prompt (repeatable; these come before the --prompts file's)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per prompt (default 64)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence tokens")
    ap.add_argument("--no-chat-template", action="store_true",
                    help="send prompts as raw text even if the tokenizer has a chat template")
    ap.add_argument("--out", help="JSONL results file (default: print the texts to the job log)")
    # The same engine options as `specoffload generate` (model and checkpoint folders must be
    # visible on the cluster's nodes; --ray-address defaults to the job's cluster, RAY_ADDRESS).
    from specoffload.cli import add_engine_options

    add_engine_options(ap)
    return ap


def run(args) -> int:
    from specoffload import SamplingParams
    from specoffload.cli import (auto_workload, collect_prompts, generate_pending, llm_from_args, open_results,
                                 print_texts)
    from specoffload.errors import ConfigError

    prompts = collect_prompts(args.prompt, args.prompts)
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            ignore_eos=args.ignore_eos)
    chat = not args.no_chat_template
    # --out is a journal: a job run again after a crash keeps what is there and runs the rest.
    journal = open_results(args.out, prompts, [params] * len(prompts), args.model, chat, prog="generate_job")
    if journal is not None and not journal.pending():
        print(f"generate_job: all {len(prompts)} requests already in {args.out}; nothing to run", flush=True)
        return 0

    # LLM checks the model and draft first, then joins Ray (`ray_env.ensure_ray`): in a job,
    # the job's cluster from RAY_ADDRESS.
    workload = auto_workload(args, prompts) if args.plan == "auto" else None  # the planner's input
    llm = llm_from_args(args, progress=False, workload=workload)
    try:
        import ray

        print(f"generate_job: {len(prompts)} prompts on Ray cluster {ray.get_runtime_context().gcs_address}, "
              f"engine run id {llm.run_id} (dashboard metrics tag run={llm.run_id})", flush=True)
        t0 = time.perf_counter()
        outs = generate_pending(llm, prompts, [params] * len(prompts), journal, chat)
        wall = time.perf_counter() - t0
    finally:
        if journal:
            journal.close()
        llm.shutdown()
    if not args.out:
        print_texts(prompts, outs)
    s = llm.last_stats
    line = (f"generate_job: {len(outs)} requests, {s.get('tokens', 0)} tokens in {wall:.2f} s "
            f"({s.get('tokens_per_s', 0)} tok/s)")
    if s.get("acceptance") is not None:
        line += f", acceptance {s['acceptance']:.2f}"
    if args.out:
        line += f"; results in {args.out}"
    print(line, flush=True)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from specoffload.errors import SpecOffloadError
    except ImportError as e:
        print(f"generate_job: error: cannot import specoffload ({e}); install it on the cluster's nodes",
              file=sys.stderr)
        return 2
    try:
        return run(args)
    except SpecOffloadError as e:
        e = getattr(e, "cause", None) or e  # unwrap errors raised inside a Ray actor
        print(f"generate_job: error: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("generate_job: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
