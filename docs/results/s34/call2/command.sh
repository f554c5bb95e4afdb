specoffload bench --workload w1-long --modes single@auto/m2 --draft-window 64 --draft-sinks 4 --draft-fp8 \
  --prefill-batch 16 --resident 3 --slots 2 --gpu-kv-rows auto --micro-batches 2 --copy-chunk-mib 64 \
  --baseline-resident auto --baseline-gpu-kv-rows 0,auto --baseline-copy-chunk-mib 64 --stall-s 120 \
  --no-dashboard --json w1long.json
