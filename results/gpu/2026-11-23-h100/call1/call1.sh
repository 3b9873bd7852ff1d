#!/bin/bash
# GPU call 1, in priority order (each step writes its own file under $OUT, so a cut-off keeps what
# finished): env; a KD-FixMatch smoke run on CUDA; the kernel and augment tests compiled; our
# --bench (bf16/fp32 x eager/compile); kernels.py --bench --quick; the peer port alone.
set -u
export PYTHONUNBUFFERED=1
O=${OUT:-/tmp/out}; mkdir -p $O
PY=${PY:-python3}
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $O/timeline.txt; }
{ nvidia-smi; $PY -c "import sys, torch, torchvision, triton, numpy, sklearn, scipy; print(sys.version); print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__, 'sklearn', sklearn.__version__, 'scipy', scipy.__version__); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no cuda')"; nproc; free -g; } > $O/env.txt 2>&1
DATA=${DATA:-/tmp/data}; mkdir -p $DATA && tar -xJf .gpu/cifar10-jpeg.tar.xz -C $DATA
( $PY .gpu/cifar_pickles.py $DATA/cifar10 .peer/kekmodel/data > /tmp/pickles.log 2>&1 ) &
PICK=$!
stamp "env + data"
D="--dataset folder --data-dir $DATA/cifar10 --labels 4000 --arch wrn28_2 ${BENCH_EXTRA:-}"
clean() { tr '\r' '\n' | grep -v -E "decode|^\s*$"; }
timeout ${ST:-100} $PY kdfixmatch.py $D --method kdfixmatch --steps 64 --eval-every 32 --out /tmp/smoke 2>&1 | clean | tail -15 > $O/smoke.txt
stamp "smoke: $(tail -1 $O/smoke.txt)"
timeout ${TT:-160} $PY -m pytest -q -x test_kdfixmatch.py -k "pl_ or dec_ or dispatch or kernel or heuristic or augment or fixmatch_step" 2>&1 | tail -25 > $O/tests_kernels_cuda.txt
stamp "kernel tests: $(tail -1 $O/tests_kernels_cuda.txt)"
for v in "bf16:" "fp32:" "bf16:--compile" "fp32:--compile"; do
  timeout ${BT:-150} $PY kdfixmatch.py --bench $D --precision ${v%%:*} ${v#*:} 2>&1 | clean | tail -3 >> $O/bench_kdfixmatch.txt
  stamp "bench $v: $(tail -1 $O/bench_kdfixmatch.txt)"
done
timeout ${KT:-150} $PY kernels.py --bench --quick > $O/bench_kernels.txt 2>&1
stamp "kernels bench done"
wait $PICK; cat /tmp/pickles.log >> $O/timeline.txt
cd .peer/kekmodel && sed -i 's/unlabeled_iter\.next()/next(unlabeled_iter)/g; s/labeled_iter\.next()/next(labeled_iter)/g' train.py
timeout ${PT:-60} $PY ../../.gpu/peer_kekmodel.py --dataset cifar10 --num-labeled 4000 --arch wideresnet \
  --seed 0 --out /tmp/kek_alone --total-steps 1048576 --eval-step 1024 --num-workers 12 > /tmp/peer_alone.log 2>&1
cd ../..
tr '\r' '\n' < /tmp/peer_alone.log | grep -E "Batch:|Error|error" | tail -3 > $O/peer_alone.txt
stamp "peer alone: $(tail -1 $O/peer_alone.txt | cut -c1-200)"
cat $O/bench_kdfixmatch.txt; tail -25 $O/bench_kernels.txt
