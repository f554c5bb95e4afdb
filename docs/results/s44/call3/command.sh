# Session 44, call 3: the same warm H100 (main at 205fd04); .device/w4d.sh, cut by the call's own 340 s limit at ~95 s of the run
# the W4 command of call 2 without --repeat, and beside it a loop that, once "actors up" is in the log (before the warm-up),
# writes MemFree/MemAvailable/Cached/Shmem, runs `sync; echo 1 > /proc/sys/vm/drop_caches`, and writes them again (mem.txt)
