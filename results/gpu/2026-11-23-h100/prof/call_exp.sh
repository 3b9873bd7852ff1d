#!/bin/bash
set -u; export PYTHONUNBUFFERED=1; O=${OUT:-/tmp/out}; mkdir -p $O; PY=${PY:-python3}
DATA=/tmp/data; mkdir -p $DATA && tar -xJf .gpu/cifar10-jpeg.tar.xz -C $DATA
PYTHONPATH=. timeout 240 $PY .gpu/exp.py $DATA/cifar10 eager reduce-overhead 2>&1 | grep -v -E "decode|^\s*$|Warning|warn" > $O/exp_cudagraphs.txt
cat $O/exp_cudagraphs.txt | tail -20
