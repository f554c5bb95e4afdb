# a fresh H100 capped at 24 GiB (call 4, main at the commit that copies SharedInput.rows' scales); .device/d1.sh
python3 - # torch._scaled_mm with row scales sliced from row 0, 1, 4, 5 of a [69, 1] fp32 tensor (pre.log's first lines)
python3 -m pytest -q -m cuda tests/test_fused.py
python3 scripts/profile_prefill_layer.py --rows 8 --chunk-mib 64 --fused
specoffload bench --workload w4 --gen 128 --modes single@4 --micro-batches 2 --gpu-kv-rows 48 --copy-chunk-mib 8 \
  --draft-window 64 --draft-sinks 4 --slots 4 --prefill-batch 8 --resident 0 --stall-s 120 --trace-dir tr --no-dashboard \
  --mapped-out 1 --fused-prefill 1,0 --json w4.json
python3 scripts/trace_layer_chain.py tr/trace_single_k4_{fused,eager}.json --rounds 10:40   # analysis.txt
