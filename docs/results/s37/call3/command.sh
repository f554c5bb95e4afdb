# one H100 capped at 24 GiB, main at 5972d9d (same machine as call 2); .device/n3.sh
specoffload bench --workload w4 --gen 128 --modes single@4 --micro-batches 2 --gpu-kv-rows 48 --copy-chunk-mib 8 \
  --draft-window 64 --draft-sinks 4 --slots 4 --prefill-batch 8 --resident 0 --stall-s 120 --trace-dir tr --no-dashboard \
  --json w4.json
python scripts/trace_layer_chain.py tr/trace_single_k4.json --rounds 10:40
