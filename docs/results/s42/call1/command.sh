# one H100 (80 GB), capped at 24 GiB by the check; main at f80e11d; 393 s of device time were left
GC_LIMIT=290 bash .device/g.sh   # python3 scripts/gpu_check.py --work /tmp/gc --logs /tmp/gclogs --time-limit 290
