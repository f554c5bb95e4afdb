source .device/pre.sh
python3 -m specoffload.cli bench --workload w1-long --modes single@auto --draft-window 64 --draft-sinks 4 --draft-fp8 \
  --prefill-batch 16 --resident 3 --slots 2 --gpu-kv-rows 64 --micro-batches ${MB:-1,2} --copy-chunk-mib 64 --baseline-resident auto \
  --baseline-gpu-kv-rows 0 --baseline-copy-chunk-mib 64 --stall-s 120 --trace-dir tr --no-dashboard $EXTRA \
  --json $OUT/w1long.json 2>&1 | tee $OUT/w1long.log | grep -v "^\s*$" | tail -40
chains
