# Session 44, call 4: a fresh H100 (main at cd6caee's profile script and test change, before the plan field); .device/p1.sh
# four profiles in turn, without and with glibc keeping freed memory (host_malloc.py), then the placement CUDA tests,
# which the call's 270 s limit cut before they reported (placement.txt came back empty)
for k in "" "--keep-freed-memory" "" "--keep-freed-memory"; do
  python3 scripts/profile_cpu_attention.py --heads 64,8 --batch 72 --queries 5 --keys 640 --layers 16 --passes 4 --threads 14 $k
done >> prof.txt
python3 -m pytest -q -m cuda tests/test_gpu_placement.py
