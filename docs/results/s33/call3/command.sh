source .device/pre.sh
python3 -m pytest -q -m cuda -p no:cacheprovider -rfE tests/test_cuda_streams.py tests/test_draft_graph.py tests/test_weight_stream.py 2>&1 | tail -5 | tee $OUT/pytest.txt
python3 -m specoffload.cli bench --workload w1-long --modes single@auto/m1,single@auto/m2 --draft-window 64 --draft-sinks 4 --draft-fp8 \
  --prefill-batch 16 --resident 3 --slots 2 --gpu-kv-rows 64 --micro-batches 2 --copy-chunk-mib 64 --baseline-resident auto \
  --baseline-gpu-kv-rows 0 --baseline-copy-chunk-mib 64 --stall-s 120 --trace-dir tr --no-dashboard \
  --json $OUT/w1long.json 2>&1 | tee $OUT/w1long.log | grep -v "^\s*$" | grep -v "pid=" | tail -25
chains
