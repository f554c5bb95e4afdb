source .device/setup.sh >/dev/null 2>&1
mkdir -p /tmp/pkg && ln -sfn $PWD /tmp/pkg/specoffload && export PYTHONPATH=/tmp/pkg:$PYTHONPATH
export SPECOFFLOAD_DASHBOARD=0 RAY_ADDRESS=local
timeout 370 python3 -m specoffload.cli bench --workload w4 --gen 128 --modes single@auto \
  --copy-chunk-mib 8 --draft-window 64 --draft-sinks 4 --slots 4 --prefill-batch 16 --resident auto \
  --no-dashboard --json $OUT/w4.json > $OUT/w4.log 2>&1
echo w4_rc=$?
grep -E '^\{"mode"' $OUT/w4.log | python3 -c "
import sys,json
for l in sys.stdin:
    d=json.loads(l); print({k: d[k] for k in ('mode','tokens_per_s','decode_tokens_per_s','prefill_s','passes','s_per_pass','k_mean','k_counts','tokens_per_seq_pass','acceptance','rows_busy','cpu_attention_s','copy_s','gpu_peak_gib','wall_s')})"
grep -E "actors up" $OUT/w4.log | cut -c1-200
timeout 75 python3 -m specoffload.cli bench --workload w1-small --target-layers 2 --draft-layers 4 --batch 64 --gen 12 --prompt-len 256 --modes none,single --no-warmup --json $OUT/bench_w1small.json > $OUT/bench_w1small.log 2>&1
echo w1small_rc=$?
grep -E "^(none|single)" $OUT/bench_w1small.log
