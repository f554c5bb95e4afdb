"""Ray Jobs entrypoint: generate completions on the cluster the job runs in.

    ray job submit --address http://HEAD:8265 --working-dir scripts -- \\
        python generate_job.py --prompts prompts.jsonl --out /shared/results.jsonl

Inside a job Ray sets RAY_ADDRESS, so the driver joins the job's cluster (outside a job it
joins a running local cluster or starts one, like the `specoffload` CLI). The
`specoffload` package must be importable by the job's Python on every node (installed
there); the working dir only needs to carry this script.

It runs what `specoffload generate` runs (cli.run_generate), with the same options.
Results go to --out as JSONL (a journal: a job run again after a crash keeps what is there
and runs the rest), one line per request as it finishes (the order requests
finish in, each line has its prompt's "index"). Problems the user can fix print one line
and exit 2.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """`specoffload generate`'s options (model and checkpoint folders must be visible on the
    cluster's nodes; --ray-address defaults to the job's cluster, RAY_ADDRESS)."""
    from specoffload.cli import add_generate_options

    ap = argparse.ArgumentParser(prog="generate_job.py", description=__doc__.splitlines()[0])
    add_generate_options(ap)
    ap.set_defaults(quiet=True)  # a job's log is not a terminal: no progress bar
    return ap


def main(argv=None) -> int:
    try:
        from specoffload.cli import one_line_errors, run_generate
    except ImportError as e:
        print(f"generate_job: error: cannot import specoffload ({e}); install it on the cluster's nodes",
              file=sys.stderr)
        return 2
    return one_line_errors("generate_job", run_generate, build_parser().parse_args(argv), "generate_job")


if __name__ == "__main__":
    sys.exit(main())
