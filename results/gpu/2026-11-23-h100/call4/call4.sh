#!/bin/bash
# GPU call 4: (a) --bench of the current code alone on the GPU (bf16 / fp32 eager, bf16 compiled);
# (b) CIFAR-10 (JPEG copy), 4000 labels, WRN-28-2, seed 0, side by side in the background (setsid):
# supervised K, FixMatch K, KD-FixMatch CE from that FixMatch (K), FixMatch 2K, the peer port at K;
# (c) the whole test suite on CUDA alongside. Returns at W s with partial results; call5.sh collects.
set -u
export PYTHONUNBUFFERED=1
O=${OUT:-/tmp/out}; mkdir -p $O
PY=${PY:-python3}; K=${K:?steps}; E=${E:?eval every}; W=${W:-585}
T0=$(date +%s); R=/tmp/runs; mkdir -p $R
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $O/timeline.txt; }
DATA=${DATA:-/tmp/data}; mkdir -p $DATA && tar -xJf .gpu/cifar10-jpeg.tar.xz -C $DATA
( $PY .gpu/cifar_pickles.py $DATA/cifar10 .peer/kekmodel/data > /tmp/pickles.log 2>&1 ) & PICK=$!
D="--dataset folder --data-dir $DATA/cifar10 --labels 4000 --arch wrn28_2 ${EXTRA:-}"
clean() { tr '\r' '\n' | grep -v -E "decode|^\s*$|[Ww]arn"; }
for v in ${BENCH:-"bf16:" "fp32:" "bf16:--compile"}; do
  timeout 120 $PY kdfixmatch.py --bench $D --precision ${v%%:*} ${v#*:} 2>&1 | clean | tail -1 >> $O/bench_kdfixmatch.txt
  stamp "bench $v: $(tail -1 $O/bench_kdfixmatch.txt)"
done
C="$D --seed 0 --eval-every $E"
run() { local name=$1; shift; echo "$PY kdfixmatch.py $* --out $R/$name" >> $R/commands.txt
        setsid nohup $PY kdfixmatch.py "$@" --out $R/$name > $R/$name.log 2>&1 < /dev/null & }
run fm --method fixmatch --steps $K $C
run fm2x --method fixmatch --steps $((2 * K)) $C
run sup --method supervised --steps $K $C
setsid nohup bash -c "while [ ! -f $R/fm/results.json ]; do sleep 5; done; echo '$PY kdfixmatch.py --method kdfixmatch --loss ce --outer-from $R/fm --steps $K $C --out $R/kd' >> $R/commands.txt; exec $PY kdfixmatch.py --method kdfixmatch --loss ce --outer-from $R/fm --steps $K $C --out $R/kd > $R/kd.log 2>&1" > /dev/null 2>&1 < /dev/null &
wait $PICK
cd .peer/kekmodel && sed -i 's/unlabeled_iter\.next()/next(unlabeled_iter)/g; s/labeled_iter\.next()/next(labeled_iter)/g' train.py
P="--dataset cifar10 --num-labeled 4000 --arch wideresnet --seed 0 --out /tmp/kek --total-steps $K --eval-step $E --num-workers 12"
echo "cd .peer/kekmodel && $PY ../../.gpu/peer_kekmodel.py $P" >> $R/commands.txt
setsid nohup $PY ../../.gpu/peer_kekmodel.py $P > $R/peer.log 2>&1 < /dev/null &
cd ../..
stamp "training launched: K=$K E=$E"
timeout $((W - $(date +%s) + T0 - 20)) $PY -m pytest -q test_kdfixmatch.py > $R/tests_cuda.log 2>&1
stamp "tests: $(tail -1 $R/tests_cuda.log)"
bash .gpu/collect.sh $W $T0
