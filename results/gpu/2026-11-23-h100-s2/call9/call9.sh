#!/bin/bash
# Session 2, GPU call 9: the two tests that failed on CUDA in call 7 (and the augment/prefetch
# tests), after their fixes; kernels.py --bench --only loss (the large rows with 3 decimals).
export PYTHONUNBUFFERED=1; O=${OUT:-/tmp/out}; mkdir -p $O; T0=$(date +%s)
timeout 200 python3 -m pytest -q -rfEs test_kdfixmatch.py -k "prefetched or decode_every_mode or augment or pl_ or kernel" > $O/tests_cuda_fixed.txt 2>&1
echo "[$(( $(date +%s) - T0 )) s] $(tail -1 $O/tests_cuda_fixed.txt)" | tee -a $O/timeline.txt
timeout 200 python3 kernels.py --bench --only loss > $O/bench_kernels_loss.txt 2>&1
echo "[$(( $(date +%s) - T0 )) s] kernels loss bench" | tee -a $O/timeline.txt
tail -12 $O/bench_kernels_loss.txt
