# Session 45, call 1: the GPU check at main e761e4c, one H100 capped at 24 GiB.
# .device/ holds ../shared/device (Ray for the device machine) and the dashboard's wheels.
source .device/setup.sh && python3 scripts/device_dashboard.py install .device/dashboard
python3 scripts/gpu_check.py --work /tmp/gc --logs /tmp/gclogs --time-limit 540
