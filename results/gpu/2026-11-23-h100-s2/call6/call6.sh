#!/bin/bash
# Session 2, GPU call 6 (each step writes its own file under $OUT; a cut-off keeps what finished):
# (a) the prefetch and augment tests on CUDA; (b) --bench of the previous commit ("before", no
# prefetch thread) and of this one ("after"), interleaved, alone on the GPU; (c) kernels.py --bench
# (every case); (d) in the background (setsid): the peer port at K, our FixMatch fp32 at K (against
# call 4's bf16 run), and the whole test suite on CUDA. Returns at W s; collect2.sh gathers.
set -u
export PYTHONUNBUFFERED=1
O=${OUT:-/tmp/out}; mkdir -p $O
PY=${PY:-python3}; K=${K:-5120}; E=${E:-256}; W=${W:-570}
T0=$(date +%s); R=/tmp/runs; mkdir -p $R
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $O/timeline.txt; }
{ nvidia-smi; $PY -c "import sys, torch, torchvision, triton, numpy; print(sys.version); print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__); print(torch.cuda.get_device_name(0))"; nproc; } > $O/env.txt 2>&1
DATA=/tmp/data; mkdir -p $DATA && tar -xJf .gpu/cifar10-jpeg.tar.xz -C $DATA
stamp "env + data"
timeout 150 $PY -m pytest -q test_kdfixmatch.py -k "prefetched or augment_on_cuda or batched_augment" > $O/tests_prefetch_cuda.txt 2>&1
stamp "prefetch/augment tests: $(tail -1 $O/tests_prefetch_cuda.txt)"
D="--dataset folder --data-dir $DATA/cifar10 --labels 4000 --arch wrn28_2"
clean() { tr '\r' '\n' | grep -v -E "decode|^\s*$|[Ww]arn"; }
for v in before:bf16: after:bf16: before:bf16:--compile after:bf16:--compile after:fp32: after:fp32:--compile; do
  IFS=: read -r which prec flag <<< "$v"; dir=.; [ $which = before ] && dir=.gpu/before
  echo "$which: $(timeout 150 $PY $dir/kdfixmatch.py --bench $D --precision $prec $flag 2>&1 | clean | tail -1)" >> $O/bench_kdfixmatch.txt
  stamp "bench $v: $(tail -1 $O/bench_kdfixmatch.txt)"
done
( $PY .gpu/cifar_pickles.py $DATA/cifar10 .peer/kekmodel/data > /tmp/pickles.log 2>&1 ) & PICK=$!
timeout 240 $PY kernels.py --bench > $O/bench_kernels.txt 2>&1
stamp "kernels bench: $(grep -c . $O/bench_kernels.txt) lines"
wait $PICK
C="$D --seed 0 --eval-every $E"
echo "$PY kdfixmatch.py --method fixmatch --steps $K $C --precision fp32 --out $R/fm32" >> $R/commands.txt
setsid nohup $PY kdfixmatch.py --method fixmatch --steps $K $C --precision fp32 --out $R/fm32 > $R/fm32.log 2>&1 < /dev/null &
cd .peer/kekmodel && sed -i 's/unlabeled_iter\.next()/next(unlabeled_iter)/g; s/labeled_iter\.next()/next(labeled_iter)/g' train.py
P="--dataset cifar10 --num-labeled 4000 --arch wideresnet --seed 0 --out /tmp/kek --total-steps $K --eval-step $E --num-workers 12"
echo "cd .peer/kekmodel && $PY ../../.gpu/peer_kekmodel.py $P" >> $R/commands.txt
setsid nohup $PY ../../.gpu/peer_kekmodel.py $P > $R/peer.log 2>&1 < /dev/null &
cd ../..
setsid nohup bash -c "timeout 1150 $PY -m pytest -q -rfEs test_kdfixmatch.py > $R/tests_cuda.log 2>&1" > /dev/null 2>&1 < /dev/null &
stamp "training + test suite launched: K=$K E=$E"
bash .gpu/collect2.sh $W $T0
