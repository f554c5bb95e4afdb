# the same warm H100 as call 4 (call 5): the eager run alone, first in its process
specoffload bench --workload w4 --gen 128 --modes single@4 --micro-batches 2 --gpu-kv-rows 48 --copy-chunk-mib 8 \
  --draft-window 64 --draft-sinks 4 --slots 4 --prefill-batch 8 --resident 0 --stall-s 120 --trace-dir tr --no-dashboard \
  --mapped-out 1 --fused-prefill 0 --json w4.json
python3 scripts/trace_layer_chain.py tr/trace_single_k4.json --rounds 10:40
