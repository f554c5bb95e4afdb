# another H100 capped at 24 GiB, main at aec1f85 (rings kept, priming beside); .device/n7.sh with
# EXTRA="--draft-feed-last 1 --draft-prime-beside 1,0 --refill-rows 16"
specoffload bench --workload w1-long --modes single@auto/m2 --draft-window 64 --draft-sinks 4 --draft-fp8 \
  --prefill-batch 16 --resident 3 --slots 2 --gpu-kv-rows auto --micro-batches 2 --copy-chunk-mib 64 --baseline-resident auto \
  --baseline-gpu-kv-rows auto --baseline-copy-chunk-mib 64 --draft-feed-last 1 --draft-prime-beside 1,0 --refill-rows 16 \
  --stall-s 120 --trace-dir tr --no-dashboard --json w1long.json
python scripts/trace_join_passes.py trace_single_kauto_m2_pb.json.gz   # and _pi
