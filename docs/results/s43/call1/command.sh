# Session 43, the one device call that started (one H100, 15:03 UTC, main at b4b1b88; .device/w4h.sh with HUGE=1):
# the host's memory and THP modes, the CPU attention profile at 14 threads with huge and small pages,
# then W4 with the CPU worker's KV cache advised into huge pages, first (and only) in its process.
grep -E "^(MemTotal|MemFree|MemAvailable|Cached|Shmem|AnonPages|AnonHugePages|Mlocked|Hugepagesize|HugePages_Total):" /proc/meminfo > meminfo.txt
cat /sys/kernel/mm/transparent_hugepage/enabled /sys/kernel/mm/transparent_hugepage/defrag >> meminfo.txt
python3 scripts/profile_cpu_attention.py --heads 64,8 --batch 72 --queries 5 --keys 640 --layers 16 --passes 4 \
    --threads 14 --variants huge-pages,small-pages >> meminfo.txt
specoffload bench --workload w4 --gen 128 --modes single@4 --micro-batches 2 --gpu-kv-rows 48 --copy-chunk-mib 8 \
    --draft-window 64 --draft-sinks 4 --slots 4 --prefill-batch 8 --resident 0 --stall-s 120 --trace-dir tr \
    --no-dashboard --kv-huge-pages 1 --json w4.json | tee w4.log
grep -E "^(MemAvailable|AnonHugePages|Shmem):" /proc/meminfo >> meminfo.txt   # after the bench
