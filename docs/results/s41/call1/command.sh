# one H100 capped at 24 GiB, main at 9ff5c20 (session 41 call 1, 314.6 s of device time)
bash .device/g.sh   # source .device/setup.sh; python3 scripts/gpu_check.py --work /tmp/gc --logs /tmp/gclogs --time-limit 500
