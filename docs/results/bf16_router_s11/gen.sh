#!/bin/bash
# usage: gen.sh NAME MODEL [flags...]
name=$1; model=$2; shift 2
. /work/main/.venv/bin/activate
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false SPECOFFLOAD_DASHBOARD=0 PYTHONPATH=/work
rm -f /tmp/bf16exp/$name.jsonl
s=$(date +%s.%N)
python -m specoffload.cli generate --model /tmp/bf16exp/$model --prompts /tmp/bf16exp/prompts.jsonl --max-tokens 32 \
  --ignore-eos --logprobs 2 --quiet --device cpu --ray-address local --out /tmp/bf16exp/$name.jsonl "$@" > /tmp/bf16exp/$name.log 2>&1
rc=$?
echo "$name rc=$rc $(echo "$(date +%s.%N) - $s" | bc) s: $*" | tee -a /tmp/bf16exp/timings.txt
