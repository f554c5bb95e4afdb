"""`specoffload plan`: measure this machine (or read its figures from a file), then print the
placement, batch size, schedule and draft settings the planner predicts to be fastest, with the
candidates it weighed, and write the plan as a file `specoffload generate --plan` takes.

    specoffload plan --model DIR --draft DRAFT_DIR --prompt-len 512 --gen 128 --requests 192 \\
        --acceptance 0.8 --gpu-memory 24GiB --out plan.json
    specoffload plan --shapes w1 --hardware configs/hardware/h200_design.json --acceptance 0.8

Errors the user can fix print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="specoffload plan", description=__doc__.split("\n\n")[0])
    m = ap.add_mutually_exclusive_group()
    m.add_argument("--model", help="The target checkpoint folder or Hub id (default: the embedded model).")
    m.add_argument("--shapes", choices=["w1", "w3", "w4"], help="Plan for model shapes without a checkpoint: "
                                                          "w1 is a Mixtral-8x7B target with a Mistral-7B draft, "
                                                          "w3 a Qwen3-30B-A3B target with a Qwen3-0.6B draft (bf16), "
                                                          "w4 a Llama-3.1-70B target in fp8 with a Llama-3.2-1B "
                                                          "draft.")
    ap.add_argument("--draft", help="'self:N' or a draft checkpoint folder; leave it out to plan without "
                                    "speculation.")
    ap.add_argument("--hardware", help="Read the machine's figures from this hardware JSON file (see "
                                       "configs/hardware/*.json) instead of measuring them now.")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="The device to measure (default: cuda if this machine has a GPU).")
    ap.add_argument("--gpu-memory", help="The GPU memory cap to plan for, e.g. 24GiB (it overrides the file's).")
    ap.add_argument("--save-hardware", help="Write the measured (or read) figures here as JSON.")
    ap.add_argument("--prompt-len", type=int, default=512, help="Tokens per prompt (default 512).")
    ap.add_argument("--gen", type=int, default=128, help="Tokens generated per request (default 128).")
    ap.add_argument("--requests", type=int, default=192, help="The number of requests in the job (default 192).")
    ap.add_argument("--acceptance", type=float, default=0.7,
                    help="The per-token probability that the draft's token is the target's (default 0.7).")
    ap.add_argument("--window-acceptance", default="",
                    help="The acceptance per draft window, e.g. 64=0.62,128=0.7; unlisted windows take "
                         "--acceptance.")
    ap.add_argument("--schedules", default="none,single,dual",
                    help="A comma list of the schedules to consider (default: all three).")
    ap.add_argument("--draft-fp8", choices=["auto", "on", "off"], default="auto",
                    help="Whether a separate draft's matrices are in fp8: where faster (auto, the default; its "
                         "acceptance is taken to be the bf16 draft's), always (on), or never (off).")
    ap.add_argument("--quantize", choices=["fp8"], help="Plan for the target's matrices in fp8 (an fp8 "
                                                        "checkpoint is without it): half the bytes per layer.")
    ap.add_argument("--top", type=int, default=10, help="The number of candidates to list (default 10).")
    ap.add_argument("--out", help="Write the chosen plan here (a Plan JSON file).")
    ap.add_argument("--json", help="Write the choice, its prediction and the candidates here.")
    return ap


def _window_acceptance(text: str) -> dict:
    from .errors import ConfigError

    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        w, sep, a = part.partition("=")
        try:
            out[int(w)] = float(a)
        except ValueError:
            raise ConfigError(f"--window-acceptance: cannot read {part!r} (use e.g. 128=0.7)") from None
    return out


def _write(flag: str, path: str, text: str):
    from .errors import ConfigError

    try:
        Path(path).write_text(text)
    except OSError as e:
        raise ConfigError(f"cannot write {flag} {path}: {e.strerror}") from None


def _specs(args):
    from .errors import ConfigError
    from .llm import parse_draft
    from .models.spec import load_spec

    if args.shapes == "w1":
        from .sources.constructed import mistral_7b, mixtral_8x7b

        if args.draft not in (None, "w1"):
            raise ConfigError("--shapes w1 brings its own draft shape; leave out --draft")
        return mixtral_8x7b(), mistral_7b(), 0, "--shapes w1"
    if args.shapes == "w3":
        from .sources.w3_shapes import qwen3_0_6b, qwen3_30b_a3b

        if args.draft not in (None, "w3"):
            raise ConfigError("--shapes w3 brings its own draft shape; leave out --draft")
        return qwen3_30b_a3b(), qwen3_0_6b(), 0, "--shapes w3"
    if args.shapes == "w4":  # the target in fp8, as W4 runs it
        from dataclasses import replace

        from .sources.w4_shapes import llama_3_1_70b, llama_3_2_1b

        if args.draft not in (None, "w4"):
            raise ConfigError("--shapes w4 brings its own draft shape; leave out --draft")
        return replace(llama_3_1_70b(), weights="fp8"), llama_3_2_1b(), 0, "--shapes w4"
    if args.model is None:
        from .sources.default_model import default_model_dir

        args.model = str(default_model_dir())
    from .sources.hub import resolve_model

    target = load_spec(resolve_model(args.model))
    desc = parse_draft(args.draft, target.num_layers)
    if desc is None:
        return target, None, 0, args.model
    if desc[0] == "self":
        return target, None, desc[1], args.model
    return target, load_spec(desc[1], dtype=target.dtype), 0, args.model


def main(argv=None) -> int:
    from .errors import SpecOffloadError

    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except SpecOffloadError as e:
        print(f"specoffload plan: error: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from dataclasses import asdict, replace

    from .errors import ConfigError
    from .placement.hardware import Hardware, measure
    from .placement.planner import Workload, plan

    target, draft, self_layers, where = _specs(args)
    if args.quantize:
        target = replace(target, weights="fp8")
    wl = Workload(args.prompt_len, args.gen, args.requests, args.acceptance,
                  tuple(_window_acceptance(args.window_acceptance).items()))
    if args.hardware:
        hw = Hardware.from_file(args.hardware).with_gpu_memory(args.gpu_memory)
    else:
        print("measuring this machine (copy, memory, matmul and CPU attention rates) ...", file=sys.stderr)
        hw = measure(args.device, args.gpu_memory)
    if args.save_hardware:
        _write("--save-hardware", args.save_hardware, json.dumps(hw.to_dict(), indent=2) + "\n")
    schedules = tuple(s.strip() for s in args.schedules.split(",") if s.strip())
    if not schedules:
        raise ConfigError("--schedules names no schedule")
    choice = plan(target, draft, hw, wl, self_layers=self_layers, schedules=schedules,
                  draft_fp8={"auto": None, "on": True, "off": False}[args.draft_fp8])
    b = choice.best

    print(f"machine: {hw.device}, {hw.gpu_memory / 2**30:.1f} GiB device memory, {hw.host_memory / 2**30:.1f} GiB host, "
          f"copy {hw.h2d_GBps} GB/s, matmul {hw.device_tflops} TFLOP/s, CPU attention {hw.cpu_kv_GBps} GB/s "
          f"+ {hw.cpu_attention_gflops} GFLOP/s ({hw.measured or 'figures from ' + str(args.hardware)})")
    print(f"workload: {where}, {wl.requests} requests, prompt {wl.prompt_len}, generate {wl.gen_len}, "
          f"acceptance {wl.acceptance}")
    best_of = {}
    for c in choice.candidates:  # the best k of each (schedule, batch, draft KV) that fits
        key = (c.schedule, c.batch, c.draft_kv, c.window, c.fp8, c.draft_fp8)
        if c.fits and (key not in best_of or c.tokens_per_s > best_of[key].tokens_per_s):
            best_of[key] = c
    rows = sorted(best_of.values(), key=lambda c: -c.tokens_per_s)[: max(args.top, 1)]
    none = [c for c in best_of.values() if c.schedule == "none"]
    base = max(none, key=lambda c: c.tokens_per_s) if none else None
    print(f"{'candidate':40s} {'batch':>5s} {'resident':>8s} {'GPU rows':>8s} {'disk':>4s} {'slots':>5s} {'s/pass':>7s} {'draft s':>7s} "
          f"{'rounds':>6s} {'seconds':>8s} {'tok/s':>7s} {'x none':>6s} {'GPU GiB':>7s}")
    for c in rows:
        ratio = f"{c.tokens_per_s / base.tokens_per_s:6.2f}" if base else "     -"
        print(f"{c.label():40s} {c.batch:5d} {c.resident:8d} {c.gpu_kv_rows:8d} {c.disk:4d} {c.slots:5d} {c.pass_s:7.3f} {c.draft_s:7.3f} "
              f"{c.rounds:6.1f} {c.seconds:8.1f} {c.tokens_per_s:7.1f} {ratio} {c.gpu_bytes / 2**30:7.1f}")
    unfit = {(c.label().split(" k=")[0], c.draft_kv, c.window, c.fp8, c.draft_fp8, c.batch): c for c in choice.candidates
             if not c.fits}
    if unfit:
        print(f"{len(unfit)} placements did not fit, the largest batches:")
        for c in sorted(unfit.values(), key=lambda c: -c.batch)[:3]:
            print(f"  {c.label().split(' k=')[0]}{'' if c.schedule == 'none' else ' ' + c.label().split('draft KV ')[-1]}"
                  f", batch {c.batch}: {c.why}")
    opts = choice.run_options()
    print(f"chosen: {b.label()}, batch {b.batch}, {b.resident} resident and {b.disk} disk layers, {b.slots} slots, "
          f"{f'the first {b.gpu_kv_rows} rows KV on the GPU, ' if b.gpu_kv_rows else ''}"
          f"{f'rows refilled in place {b.refill_rows} at a time' if b.refill else 'waves'}: "
          f"{b.tokens_per_s:.1f} tok/s predicted")
    if args.out:
        _write("--out", args.out, json.dumps(asdict(choice.plan), indent=2) + "\n")
        draft_flag = f" --draft {args.draft}" if args.draft and not args.shapes else ""
        flags = "" if b.schedule == "none" else f" --schedule {opts['schedule']} -k {opts['k']} --adaptive-k"
        print(f"plan written to {args.out}; run it with: specoffload generate --plan {args.out}"
              f"{' --model ' + args.model if args.model else ''}{draft_flag}{flags}")
    if args.json:
        _write("--json", args.json, json.dumps({
            "hardware": hw.to_dict(), "workload": asdict(wl), "plan": asdict(choice.plan), "run": opts,
            "best": asdict(b), "candidates": [asdict(c) for c in rows]}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
