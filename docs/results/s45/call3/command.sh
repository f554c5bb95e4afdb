# Session 45, call 3: the CPU worker's keep of finished rows on the GPU machine's CPU (a fresh H100
# machine, main at 37354a5), 14 threads as the worker runs; no Ray needed.
python3 scripts/profile_kv_select.py --rows 192 --moved 3,5,8 --trials 5 --threads 14
python3 scripts/profile_kv_select.py --rows 156 --moved 5,8 --trials 5 --threads 14
