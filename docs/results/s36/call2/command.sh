# the same warm machine as call1; no baseline and no traces (device time)
specoffload bench --workload w1-long --modes single@auto/m2 --draft-window 64 --draft-sinks 4 --draft-fp8 \
    --prefill-batch 16 --resident 3 --slots 2 --gpu-kv-rows auto --micro-batches 2 --copy-chunk-mib 64 \
    --draft-feed-last 1,0 --stall-s 60 --no-dashboard --json w1long.json
