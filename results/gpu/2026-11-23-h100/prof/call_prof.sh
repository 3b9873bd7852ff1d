#!/bin/bash
set -u; export PYTHONUNBUFFERED=1; O=${OUT:-/tmp/out}; mkdir -p $O; PY=${PY:-python3}
DATA=/tmp/data; mkdir -p $DATA && tar -xJf .gpu/cifar10-jpeg.tar.xz -C $DATA
PYTHONPATH=. timeout 200 $PY .gpu/prof.py $DATA/cifar10 > $O/prof_bf16.txt 2>&1
grep "^==" $O/prof_bf16.txt
