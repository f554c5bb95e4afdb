# the same warm H100 (call 3, main at 9ff5c20)
python scripts/profile_prefill_fusion.py
python scripts/profile_prefill_layer.py --rows 8 --chunk-mib 64 --fused     # fused 31.98 ms: _scaled_mm refused, see call 4
specoffload bench --workload w4 --gen 128 --modes single@4 --micro-batches 2 --gpu-kv-rows 48 --copy-chunk-mib 8 \
  --draft-window 64 --draft-sinks 4 --slots 4 --prefill-batch 8 --resident 0 --stall-s 120 --trace-dir tr --no-dashboard \
  --copy-chunk-mib 64 --mapped-out 1 --fused-prefill 1,0 --json w4.json   # both ran out of GPU memory in prefill (copy chunks of 64 MiB)
