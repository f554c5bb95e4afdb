# one H100 capped at 24 GiB, main at 5972d9d; .device/n7.sh with EXTRA="--draft-feed-last 1 --refill-rows 16,32"
specoffload bench --workload w1-long --modes single@auto/m2 --draft-window 64 --draft-sinks 4 --draft-fp8 \
  --prefill-batch 16 --resident 3 --slots 2 --gpu-kv-rows auto --micro-batches 2 --copy-chunk-mib 64 --baseline-resident auto \
  --baseline-gpu-kv-rows auto --baseline-copy-chunk-mib 64 --draft-feed-last 1 --refill-rows 16,32 --stall-s 120 \
  --trace-dir tr --no-dashboard --json w1long.json
for w in joins others; do python scripts/trace_layer_chain.py tr/trace_single_kauto_m2_r16.json --rounds 0:200 --passes $w; done
python scripts/trace_join_passes.py trace_single_kauto_m2_r16.json.gz
