# same machine as call 4, main at aec1f85; .device/g.sh with GC_LIMIT=380 (the device time left)
python3 scripts/gpu_check.py --work /tmp/gc --logs /tmp/gclogs --time-limit 380
