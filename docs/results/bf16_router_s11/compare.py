import json, sys
sys.path.insert(0, "/work")
from specoffload.near_ties import Sequence, judge, logprob_lists

def load(n):
    return {r["index"]: r for r in map(json.loads, open(f"/tmp/bf16exp/{n}.jsonl"))}

def compare(got_n, ref_n, verbose=True):
    got, ref = load(got_n), load(ref_n)
    seqs = [Sequence(got[i]["token_ids"], ref[i]["token_ids"], logprob_lists(got[i].get("logprobs")),
                     logprob_lists(ref[i].get("logprobs"))) for i in sorted(ref)]
    v = judge(seqs)
    others = [b for b in v.bad if b.startswith("sequence")]
    print(f"== {got_n} vs {ref_n}: {v.equal}/{len(seqs)} equal, drift {v.drift:.3f}, allowance {v.allowance:.3f}, "
          f"{len(v.ties)} swaps of ref top2, {len(others)} otherwise")
    for b in v.bad: print("   BAD:", b)
    if verbose:
        for i, s in enumerate(seqs):
            d = s.first_difference()
            end = min(len(s.got_lps), len(s.ref_lps), len(s.got) if d is None else d)
            dr = [max((abs(g[t]-r[t]) for t in g.keys() & r.keys()), default=0.0)
                  for g, r in zip(s.got_lps[:end], s.ref_lps[:end])]
            extra = ""
            if d is not None and d < min(len(s.got), len(s.ref)):
                rt = sorted(s.ref_lps[d].items(), key=lambda kv: -kv[1])[:2]
                gt = sorted(s.got_lps[d].items(), key=lambda kv: -kv[1])[:2]
                extra = f" ref top2 {[(t, round(x,3)) for t,x in rt]} got top2 {[(t, round(x,3)) for t,x in gt]}"
            print(f"  p{i:2d} len {len(s.ref):2d} first diff {d}{extra}\n       drift " + " ".join(f"{x:.2f}" for x in dr))
    return v

if __name__ == "__main__":
    compare(sys.argv[1], sys.argv[2], verbose=len(sys.argv) < 4)
