# one H100 capped at 24 GiB (session 38 call 3, same machine)
specoffload bench --workload w1-small --modes single@3 --micro-batches 2 --early-posts 1,0 --mapped-out 1 --gen 16 --batch 64 --no-warmup --no-dashboard --json small.json
