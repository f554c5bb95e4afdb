# GPU check, then the draft profile (one call, main at 74be060 + profile_draft --join)
python scripts/gpu_check.py --work /tmp/gc --logs /tmp/gclogs --time-limit 500
python scripts/profile_draft.py --layers 8 --draft-fp8 --sinks 4 --configs 192:64:bf16,192:64:bf16:nofeed \
    --full-accept 0.3 --k 8 --rounds 8 --join 20
