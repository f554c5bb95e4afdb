import json, random
rng = random.Random(0); n, mt = 16, 32
lines = [{"prompt": " ".join(f"w{rng.randrange(3, 32000)}" for _ in range(rng.randrange(32, 480))),
          "max_tokens": rng.randrange(max(mt // 4, 1), mt + 1)} for _ in range(n)]
open("/tmp/bf16exp/prompts.jsonl", "w").write("".join(json.dumps(x) + "\n" for x in lines))
print([x["max_tokens"] for x in lines])
