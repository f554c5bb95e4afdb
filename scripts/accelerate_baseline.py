"""What users run instead: Hugging Face transformers + accelerate offload on the same prompts.

    python scripts/accelerate_baseline.py --layers 32 --requests 32 --tokens 3 --gpu-memory 24GiB
    python scripts/accelerate_baseline.py --model /path/to/hf_folder --requests 4 --tokens 2
    python scripts/accelerate_baseline.py --layers 32 --prompts prompts.json --requests 8 --tokens 3

Without --model it builds a Mixtral-8x7B-shaped model (W1's target, all 32 layers by default)
in host memory with random weights and places it exactly as `from_pretrained(device_map="auto",
max_memory=...)` does (accelerate's infer_auto_device_map, then dispatch_model): layers that do
not fit the GPU cap stay in host memory and are copied in for each forward. The full model is
93 GB, more than the GPU machine's disk holds as a checkpoint beside its RAM copy, hence in
memory. With --model it calls from_pretrained on that folder. Prompts are the first
--requests of `bench --workload w1-long` (the same seeded job), or of --prompts (a JSON list of
token-id lists: `bench --accelerate` passes the requests its modes ran), left-padded into one batch;
greedy generation of --tokens tokens is timed per step, so a slow run still says what a token
step costs. Where the batch runs out of GPU memory it is halved and run again (accelerate
plans no batch; the JSON gives the batch asked for and the one that ran). Prints one JSON
line and one summary line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # random_checkpoint's shapes


def fail(msg: str):
    """Bad input or a missing package: one line, exit status 2 (as the CLI)."""
    print(f"accelerate_baseline: error: {msg}", file=sys.stderr)
    sys.exit(2)


def require_accelerate():
    try:
        import accelerate
    except ImportError:
        fail("needs the `accelerate` package: pip install 'specoffload[accelerate]' (or its wheel)")
    return accelerate


def _bytes(text: str) -> int:
    from specoffload.placement.plan import parse_bytes

    return parse_bytes(text)


def job_prompts(requests: int, prompt_hi: int, vocab: int) -> list[list[int]]:
    """The first `requests` prompts of bench's w1-long job (its seeded EOS chain included)."""
    from specoffload.bench_job import JobShape, job_payload
    from specoffload.sources.constructed import constructed_pair, mistral_7b, mixtral_8x7b

    tsrc, _ = constructed_pair(mixtral_8x7b(1), mistral_7b(1), 0.8)
    shape = JobShape(prompt_lo=min(128, prompt_hi), prompt_hi=prompt_hi)
    job = job_payload(shape, tsrc.next_tokens().numpy(), 2, 32000)
    return [[t % vocab for t in r["prompt_ids"]] for r in job[:requests]]  # a smaller vocabulary: folded in


def read_prompts(path: str) -> list[list[int]]:
    """--prompts: a non-empty JSON list of non-empty token-id lists (one line and exit 2 otherwise)."""
    try:
        with open(path) as f:
            prompts = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"--prompts {path}: {e}")
    if not (isinstance(prompts, list) and prompts and all(
            isinstance(p, list) and p and all(isinstance(t, int) and t >= 0 for t in p) for p in prompts)):
        fail(f"--prompts {path}: not a non-empty JSON list of token-id lists")
    return prompts


def build_in_memory(acc, layers: int, max_memory: dict, std: float = 0.02):
    """W1's target shape, random bf16 weights, dispatched as device_map="auto" would."""
    import torch
    import transformers
    from accelerate.utils import set_module_tensor_to_device

    from random_checkpoint import SHAPES

    cls, kw = SHAPES["mixtral-8x7b"]
    cfg = getattr(transformers, cls)(**dict(kw, num_hidden_layers=layers, bos_token_id=1, eos_token_id=2,
                                             pad_token_id=0, tie_word_embeddings=False))
    with acc.init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    device_map = acc.infer_auto_device_map(model, max_memory=max_memory, dtype=torch.bfloat16,
                                           no_split_module_classes=model._no_split_modules)
    g = torch.Generator().manual_seed(0)
    pool = (torch.randn(1 << 24, generator=g) * std).to(torch.bfloat16)
    for name, p in list(model.named_parameters()):
        flat = pool.repeat(-(-p.numel() // pool.numel()))[: p.numel()] if p.numel() > pool.numel() else pool[: p.numel()]
        set_module_tensor_to_device(model, name, "cpu", value=flat.view(p.shape).clone())
    return acc.dispatch_model(model, device_map=device_map), device_map


class _StepClock:
    """A logits processor that only notes when each generation step's logits are ready."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="A Hugging Face checkpoint folder (default: W1's target built in memory).")
    ap.add_argument("--layers", type=int, default=32, help="Decoder layers of the in-memory model (default 32).")
    ap.add_argument("--requests", type=int, default=32, help="Prompts in the batch (default 32: padded to the "
                                                             "longest, ~32k tokens, as many as the 64 x 512 that "
                                                             "ran in 22 GiB, DESIGN.md).")
    ap.add_argument("--prompt-hi", type=int, default=1024, help="The job's longest prompt (default 1024).")
    ap.add_argument("--prompts", help="A JSON file: a list of prompts as token-id lists, the first --requests of "
                                      "which run instead of the job's.")
    ap.add_argument("--tokens", type=int, default=3, help="New tokens generated per prompt (default 3).")
    ap.add_argument("--gpu-memory", default="24GiB", help="The GPU memory cap (default 24GiB), enforced.")
    ap.add_argument("--reserve", default="2GiB", help="Of the cap, what accelerate leaves for activations "
                                                       "(default 2GiB).")
    ap.add_argument("--host-memory", default="110GiB", help="Host memory for offloaded layers (default 110GiB).")
    a = ap.parse_args(argv)
    acc = require_accelerate()
    import torch
    import transformers

    if min(a.requests, a.tokens, a.layers) < 1:
        fail("--requests, --tokens and --layers must be >= 1")
    given = read_prompts(a.prompts) if a.prompts else None
    try:
        cap, reserve, host = _bytes(a.gpu_memory), _bytes(a.reserve), _bytes(a.host_memory)
    except Exception as e:  # noqa: BLE001 - a bad size is one line
        fail(str(e))
    cuda = torch.cuda.is_available()
    max_memory = {"cpu": host}
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), 0)
        max_memory[0] = max(cap - reserve, 0)
    t0 = time.perf_counter()
    if a.model:
        if not Path(a.model, "config.json").is_file():
            fail(f"{a.model} is not a Hugging Face checkpoint folder (no config.json)")
        model = transformers.AutoModelForCausalLM.from_pretrained(a.model, device_map="auto", max_memory=max_memory,
                                                                  dtype=torch.bfloat16)
        device_map = getattr(model, "hf_device_map", None) or {"": str(model.device)}  # all on one device: none set
    else:
        model, device_map = build_in_memory(acc, a.layers, max_memory)
    load_s = time.perf_counter() - t0
    model.eval()
    vocab = model.config.vocab_size
    first = "cuda:0" if cuda else "cpu"
    n = a.requests
    while True:  # accelerate offers no batch planner: halve the batch until generate fits the cap
        prompts = [[t % vocab for t in p] for p in given[:n]] if given else job_prompts(n, a.prompt_hi, vocab)
        longest = max(map(len, prompts))
        ids = torch.zeros(len(prompts), longest, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding, as generate wants for a decoder
            ids[i, longest - len(p):] = torch.tensor(p)
            mask[i, longest - len(p):] = 1
        clock = _StepClock()
        t = time.perf_counter()
        try:
            with torch.no_grad():
                model.generate(ids.to(first), attention_mask=mask.to(first), max_new_tokens=a.tokens,
                               min_new_tokens=a.tokens, do_sample=False, pad_token_id=0,
                               logits_processor=transformers.LogitsProcessorList([clock]))
            break
        except torch.OutOfMemoryError as e:
            why = str(e).splitlines()[0]
            if n == 1:
                fail(f"generate ran out of GPU memory even for 1 prompt ({longest} tokens): raise --reserve ({why})")
            print(f"accelerate_baseline: {n} prompts (padded to {longest}) ran out of GPU memory ({why}); "
                  f"trying {n // 2}", file=sys.stderr, flush=True)
            n //= 2
            torch.cuda.empty_cache()
    wall = time.perf_counter() - t
    steps = [b - a_ for a_, b in zip(clock.times, clock.times[1:])]
    on_gpu = sum(1 for d in device_map.values() if d not in ("cpu", "disk"))
    row = {"what": "transformers+accelerate", "layers": model.config.num_hidden_layers, "requests": len(prompts),
           "requests_asked": a.requests,
           "longest_prompt": longest, "tokens": a.tokens, "gpu_memory": a.gpu_memory,
           "modules_on_gpu": on_gpu, "modules": len(device_map), "load_s": round(load_s, 1),
           "prefill_s": round(clock.times[0] - t, 2) if clock.times else None,
           "s_per_token_step": round(sum(steps) / len(steps), 2) if steps else None,
           "wall_s": round(wall, 2), "tokens_per_s": round(a.tokens * len(prompts) / wall, 3),
           "decode_tokens_per_s": round(len(prompts) / (sum(steps) / len(steps)), 3) if steps else None}
    print(json.dumps(row), flush=True)
    print(f"accelerate: {row['layers']} layers, {on_gpu}/{len(device_map)} placed modules on the GPU, "
          f"{len(prompts)} prompts (longest {longest}), {a.tokens} tokens each: {row['tokens_per_s']} tok/s end "
          f"to end ({row['prefill_s']} s to the first token, {row['s_per_token_step']} s per later step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
