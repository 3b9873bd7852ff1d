#!/bin/bash
# GPU call 5: keep collecting the background runs of call 4 (same machine) for up to W s.
export PYTHONUNBUFFERED=1; mkdir -p ${OUT:-/tmp/out}
bash .gpu/collect.sh ${W:-560}
