# Session 44, call 1: a fresh H100 (16:40 UTC, main at 205fd04); .device/g.sh with GC_LIMIT=540
python3 scripts/gpu_check.py --work /tmp/gc --logs /tmp/gclogs --time-limit 540
