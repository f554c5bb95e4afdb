set -x
source .device/setup.sh && python3 scripts/device_dashboard.py install .device/dashboard && mkdir -p /tmp/pkg && ln -sfn $PWD /tmp/pkg/specoffload && export PYTHONPATH=/tmp/pkg:$PYTHONPATH
python3 scripts/gpu_check.py --work /tmp/gc --logs /tmp/gclogs --time-limit ${GC_LIMIT:-500}
cp /tmp/gclogs/table.txt $OUT/ 2>/dev/null; tar czf $OUT/logs.tgz -C /tmp gclogs
