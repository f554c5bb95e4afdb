"""Part of the GPU check (scripts/gpu_check.py): a tiny checkpoint of every family through the
Ray actors on the GPU, greedy and self-speculative (k=3, so verification passes accept and
reject), in float32 against transformers' own generate. Plain decoding on the actors is left to
the check's Mixtral rows: each engine start costs tens of seconds on the GPU machine, and the
check must fit in minutes. Prints one line per family; exit 1 if any differs."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from hf_reference import PROMPTS, hf_greedy  # noqa: E402
from tiny_models import FAMILIES, make_tiny_with_tokenizer  # noqa: E402

from specoffload import LLM, SamplingParams  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="1/1", help="I/N: every Nth family from the Ith (the check runs parts side by side).")
    i, n = map(int, ap.parse_args(argv).part.split("/"))
    bad = 0
    root = Path(tempfile.mkdtemp(prefix="gpucheck-tiny-"))
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    for fam in FAMILIES[i - 1::n]:
        folder = make_tiny_with_tokenizer(fam, root / fam)
        ref = hf_greedy(folder, PROMPTS, 12)
        got = {}
        with LLM(str(folder), draft="self:1", device="cuda", dtype="float32", k=3, progress=False) as llm:
            got["self:1"] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        eq = {n: sum(a == b for a, b in zip(g, ref)) for n, g in got.items()}
        bad += sum(v != len(PROMPTS) for v in eq.values())
        print(f"family {fam}: " + ", ".join(f"{n} {v}/{len(PROMPTS)}" for n, v in eq.items()) + " equal to HF",
              flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
