# Session 44, call 2: the same warm H100 (main at 205fd04); .device/w4r.sh
specoffload bench --workload w4 --gen 128 --modes single@4 --micro-batches 2 --gpu-kv-rows 48 --copy-chunk-mib 8 \
  --draft-window 64 --draft-sinks 4 --slots 4 --prefill-batch 8 --resident 0 --stall-s 120 --trace-dir tr --no-dashboard \
  --repeat 2 --json w4.json | tee w4.log
python3 scripts/trace_layer_chain.py tr/trace_single_k4.json --rounds 10:40        # and tr/trace_single_k4_run2.json; analysis.txt
