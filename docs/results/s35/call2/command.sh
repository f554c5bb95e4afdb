source .device/pre.sh
python3 -m specoffload.cli bench --workload w1-long --modes single@auto/m2 --draft-window 64 --draft-sinks 4 --draft-fp8 \
  --prefill-batch 16 --resident 3 --slots 2 --gpu-kv-rows auto --micro-batches 2 --copy-chunk-mib 64 --baseline-resident auto \
  --baseline-gpu-kv-rows ${BROWS:-auto} --baseline-copy-chunk-mib 64 --join-overlap 1,0 --stall-s 120 --trace-dir tr --no-dashboard $EXTRA \
  --json $OUT/w1long.json 2>&1 | tee $OUT/w1long.log | grep -v "^\s*$" | grep -v "pid=" | tail -32
ls -la tr
for t in tr/trace_single*.json; do b=$(basename $t .json); gzip -c $t > $OUT/$b.json.gz
  for w in joins others; do python3 scripts/trace_layer_chain.py $t --rounds 0:200 --passes $w > $OUT/$b.$w.chain.txt 2>&1; done; done
head -40 $OUT/*.chain.txt
