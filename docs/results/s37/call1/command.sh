bash .device/g.sh   # python3 scripts/gpu_check.py --work /tmp/gc --logs /tmp/gclogs --time-limit 500
