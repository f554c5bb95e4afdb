import sys, time, json
from pathlib import Path
sys.path.insert(0, "/work"); sys.path.insert(0, "/work/main/scripts")
import random_checkpoint as rc
from safetensors.torch import load_file, save_file

rc.SHAPES["mixtral-small"] = ("MixtralConfig", dict(hidden_size=1024, intermediate_size=3584, num_attention_heads=16,
    num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000, num_hidden_layers=8))
out, layers = Path(sys.argv[1]), int(sys.argv[2])
gate_scale = float(sys.argv[3]) if len(sys.argv) > 3 else 1.0
t0 = time.perf_counter()
rc.write_checkpoint(out, "mixtral-small", layers, 0)
if gate_scale != 1.0:
    for j in range(layers):
        f = out / f"model-layer{j:03d}.safetensors"
        t = load_file(str(f))
        k = f"model.layers.{j}.block_sparse_moe.gate.weight"
        t[k] = (t[k].float() * gate_scale).to(t[k].dtype)
        save_file(t, str(f), metadata={"format": "pt"})
print(f"wrote {out} in {time.perf_counter()-t0:.1f}s", file=sys.stderr)
