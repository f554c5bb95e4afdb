"""Teacher-forced: the same tokens (prompt + the plain run's output) through the repo's own
ResidentModel two ways -- plain decoding (1 token per row per pass) and verification passes
(k+1 tokens per row, then the k extra rolled back) -- recording per position the log
probabilities and each layer's router top-2 experts for the token whose logits are compared."""
import json, sys, time
sys.path.insert(0, "/work")
import torch
from specoffload.models import layers as L
from specoffload.models.checkpoint import Checkpoint
from specoffload.models.resident import ResidentModel
from specoffload.llm import load_tokenizer

model, ref_name, dtype = sys.argv[1], sys.argv[2], (sys.argv[3] if len(sys.argv) > 3 else None)
K = 3
torch.manual_seed(0)
src = Checkpoint(f"/tmp/bf16exp/{model}", dtype=dtype) if dtype else Checkpoint(f"/tmp/bf16exp/{model}")
m = ResidentModel.from_source(src)
tok = load_tokenizer(f"/tmp/bf16exp/{model}")
recs = {r["index"]: r for r in map(json.loads, open(f"/tmp/bf16exp/{ref_name}.jsonl"))}
N = len(recs)
prompts = [tok(recs[i]["prompt"])["input_ids"] for i in range(N)]
outs = [recs[i]["token_ids"] for i in range(N)]

CAP = {"on": False, "calls": []}
orig = L.moe_ffn
import os
FORCE = os.environ.get("FORCE") == "1"
def forced_moe(spec, w, x, idx, experts):
    logits = L._linear(x, w["router"])
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    top_w, top_i = torch.topk(probs, spec.experts_per_token, dim=-1)
    top_i[idx] = experts
    top_w = torch.gather(probs, 1, top_i)
    if os.environ.get("FORCE_W") == "1":
        top_w[idx] = CAP["force_w"]
    elif spec.norm_topk_prob:
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    top_w = top_w.to(x.dtype)
    flat_e = top_i.reshape(-1)
    order = torch.argsort(flat_e, stable=True)
    tok = order // spec.experts_per_token
    weight = top_w.reshape(-1)[order, None]
    counts = torch.bincount(flat_e, minlength=spec.num_experts)
    if L._grouped_mm_works(x):
        return L._experts_grouped(spec, w, x, tok, weight, counts)
    return L._experts_loop(spec, w, x, tok, weight, counts)
def moe_ffn(spec, w, x, grouped=None):
    if CAP.get("force") is not None:
        j = len(CAP["calls"])
        idx, experts = CAP["force"][j]
        CAP["force_w"] = CAP["force_ws"][j]
        CAP["calls"].append(None)
        return forced_moe(spec, w, x, idx, experts)
    if CAP["on"]:
        lg = L._linear(x, w["router"]).float()
        v, i = torch.topk(lg, 3, dim=-1)
        si, o = i[:, :2].sort(dim=-1)
        pw = torch.gather(torch.softmax(lg, -1), 1, si)
        CAP["calls"].append((si.clone(), (v[:, 1] - v[:, 2]).clone(), pw / pw.sum(-1, keepdim=True)))
    return orig(spec, w, x, grouped)
L.moe_ffn = moe_ffn

def run(verify: bool):
    cap = max(len(p) for p in prompts) + 40
    cache = m.new_cache(N, cap)
    rows = list(range(N))  # sequence of each cache row
    lg = m.forward(cache, torch.tensor([t for p in prompts for t in p]), torch.tensor([len(p) for p in prompts]))
    lps = {(i, 0): torch.log_softmax(lg[r], -1) for r, i in enumerate(rows)}
    router = {}
    step = 1
    while True:
        keep = [r for r, i in enumerate(rows) if step < len(outs[i])]
        if not keep:
            break
        if len(keep) < len(rows):
            cache.select(torch.tensor(keep)); rows = [rows[r] for r in keep]
        B = len(rows)
        CAP["on"], CAP["calls"] = True, []
        if verify and FORCE:
            fi = torch.arange(B) * (K + 1)
            CAP["force_ws"] = [torch.stack([RA[i, step][2][j] for i in rows]) for j in range(m.spec.num_layers)]
            CAP["force"] = [(fi, torch.stack([RA[i, step][0][j] for i in rows])) for j in range(m.spec.num_layers)]
        if verify:
            toks = torch.tensor([[outs[i][step - 1]] + torch.randint(3, 32000, (K,)).tolist() for i in rows]).reshape(-1)
            lg = m.forward(cache, toks, torch.full((B,), K + 1), which="all").view(B, K + 1, -1)[:, 0]
            cache.truncate(cache.lens - K)
            first = torch.arange(B) * (K + 1)
        else:
            toks = torch.tensor([outs[i][step - 1] for i in rows])
            lg = m.forward(cache, toks, torch.ones(B, dtype=torch.long))
            first = torch.arange(B)
        CAP["on"] = False
        if CAP.get("force") is not None:
            CAP["force"] = None
            for r, i in enumerate(rows):
                lps[i, step] = torch.log_softmax(lg[r], -1)
                router[i, step] = RA[i, step]
            step += 1
            continue
        for r, i in enumerate(rows):
            lps[i, step] = torch.log_softmax(lg[r], -1)
            router[i, step] = (torch.stack([c[0][first[r]] for c in CAP["calls"]]),
                               torch.stack([c[1][first[r]] for c in CAP["calls"]]),
                               torch.stack([c[2][first[r]] for c in CAP["calls"]]))
        step += 1
    return lps, router

t0 = time.perf_counter()
RA = None
A, RA = run(False)
B, RB = run(True)
print(f"FORCE={FORCE} FORCE_W={os.environ.get('FORCE_W')} {model} {dtype or 'ckpt dtype'}: forced runs {time.perf_counter()-t0:.1f}s")
# check A against the engine's recorded top-2 log probabilities
dev = max(abs(A[i, t][int(k)].item() - v) for i in range(N) for t, d in enumerate(recs[i]["logprobs"]) for k, v in d.items())
print(f"plain-forced vs engine plain run's recorded logprobs: max |diff| {dev:.4f}")
if len(sys.argv) > 4:
    spec = {r["index"]: r for r in map(json.loads, open(f"/tmp/bf16exp/{sys.argv[4]}.jsonl"))}
    dv = []
    for i in range(N):
        g = spec[i]["token_ids"]
        d = next((p for p, (x, y) in enumerate(zip(g, outs[i])) if x != y), len(g))
        dv += [abs(B[i, t][int(k)].item() - v) for t, dd in enumerate(spec[i]["logprobs"][:d + 1]) for k, v in dd.items()]
    print(f"verify-forced vs engine {sys.argv[4]} recorded logprobs (up to and at its first difference): max |diff| {max(dv):.4f}")
rows = []
for (i, t) in sorted(A):
    a, b = A[i, t], B[i, t]
    d_all = (a - b).abs().max().item()
    top = torch.topk(a, 5).indices
    d_top = (a[top] - b[top]).abs().max().item()
    amax = int(a.argmax() != b.argmax())
    if t == 0:
        flips, prior, margin = 0, 0, float("nan")
    else:
        flips = int((RA[i, t][0] != RB[i, t][0]).any(-1).sum())
        prior = sum(int((RA[i, s][0] != RB[i, s][0]).any(-1).sum()) for s in range(1, t))
        margin = RA[i, t][1].min().item()
    rows.append((i, t, d_all, d_top, amax, flips, prior, margin))
import statistics as st
def summ(name, sel):
    if not sel: print(f"  {name}: none"); return
    da = [r[3] for r in sel]
    print(f"  {name}: n={len(sel)}  top5-lp |diff| median {st.median(da):.3f} max {max(da):.3f}  >0.1: {sum(x > 0.1 for x in da)}  "
          f">0.3: {sum(x > 0.3 for x in da)}  argmax changed: {sum(r[4] for r in sel)}  full-vocab max {max(r[2] for r in sel):.3f}")
gen = [r for r in rows if r[1] > 0]
print(f"positions {len(gen)}; router top-2 flips at the compared token: {sum(r[5] for r in gen)} (layer-tokens), "
      f"positions with a flip here: {sum(r[5] > 0 for r in gen)}; min router 2nd-3rd gap median {st.median(r[7] for r in gen):.3f}")
summ("flip at this position", [r for r in gen if r[5] > 0])
summ("no flip here, flip at an earlier position", [r for r in gen if r[5] == 0 and r[6] > 0])
summ("no flip here or before", [r for r in gen if r[5] == 0 and r[6] == 0])
big = sorted(gen, key=lambda r: -r[3])[:8]
print("  largest top-5 |diff|: " + "; ".join(f"seq{r[0]} pos{r[1]} {r[3]:.3f} flips here {r[5]} before {r[6]}" for r in big))
