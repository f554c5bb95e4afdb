# Session 45, call 2: W4 first in its process with the CPU worker keeping its freed memory (plan
# default since cd6caee), then 52 and 54 GPU KV rows on the same actors (both ran out of GPU memory
# in their prefill). Main at e761e4c, the same H100 as call 1, right after it.
specoffload bench --workload w4 --gen 128 --modes single@4 --micro-batches 2 --gpu-kv-rows 48,52,54 \
    --copy-chunk-mib 8 --draft-window 64 --draft-sinks 4 --slots 4 --prefill-batch 8 --resident 0 \
    --stall-s 120 --trace-dir tr --no-dashboard --json w4.json
python3 scripts/trace_layer_chain.py tr/trace_single_k4_g48.json --rounds 10:40
