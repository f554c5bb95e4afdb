# one H100 capped at 24 GiB (session 38 call 2, same machine)
specoffload bench --workload w1-long-tiny --requests 96 --modes single@2 --draft-window 8 --no-warmup --mapped-out 1,0 --early-posts 1 --no-dashboard --json tiny.json
