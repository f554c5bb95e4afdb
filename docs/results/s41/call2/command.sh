# the same warm H100 (call 2, main at 9ff5c20); .device/n7.sh with
# EXTRA="--draft-feed-last 1 --draft-prime-beside 1 --refill-rows 8,16 --mapped-out 1,0 --early-posts 1 --baseline-switches first"
specoffload bench --workload w1-long --modes single@auto/m2 --draft-window 64 --draft-sinks 4 --draft-fp8 \
  --prefill-batch 16 --resident 3 --slots 2 --gpu-kv-rows auto --micro-batches 2 --copy-chunk-mib 64 --baseline-resident auto \
  --baseline-gpu-kv-rows auto --baseline-copy-chunk-mib 64 --stall-s 120 --trace-dir tr --no-dashboard \
  --draft-feed-last 1 --draft-prime-beside 1 --refill-rows 8,16 --mapped-out 1,0 --early-posts 1 --baseline-switches first \
  --json w1long.json
# then per trace: trace_layer_chain.py --rounds 0:200 --passes joins|others, trace_join_passes.py, trace_copy_queue.py (analysis.txt)
# (the JSON and most traces did not come back: a call returns at most 8 files)
