bash .device/g.sh   # source .device/setup.sh; python3 scripts/gpu_check.py --work /tmp/gc --logs /tmp/gclogs --time-limit 500
