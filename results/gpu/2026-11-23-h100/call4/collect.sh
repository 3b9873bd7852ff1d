#!/bin/bash
# Poll the background runs until all finish or until W s after T0, then pack what exists into $OUT.
W=$1; T0=${2:-$(date +%s)}; R=/tmp/runs; O=${OUT:-/tmp/out}; PY=${PY:-python3}; K=$(grep -m1 -o "steps [0-9]*" $R/commands.txt | cut -d' ' -f2)
[ -d $R ] || { echo "no runs on this machine (it was restarted)"; exit 0; }
while [ $(( $(date +%s) - T0 )) -lt $W ]; do
  n=$(ls $R/{sup,fm,fm2x,kd}/results.json 2>/dev/null | wc -l); p=$(grep -c "top-1 acc" $R/peer.log 2>/dev/null)
  pd=$(tr '\r' '\n' < $R/peer.log 2>/dev/null | grep -c "Best top-1")
  [ "$n" = 4 ] && ! pgrep -f peer_kekmodel > /dev/null && break
  sleep 10
done
echo "[$(( $(date +%s) - T0 )) s] finished: $(ls -d $R/{sup,fm,fm2x,kd}/results.json 2>/dev/null | tr '\n' ' '); peer running: $(pgrep -f peer_kekmodel > /dev/null && echo yes || echo no)"
for f in $R/*.log; do tr '\r' '\n' < $f | grep -v -E "^\s*$|decode" | tail -300 > $f.tail; done
tar -czf $O/runs.tgz -C $R $(cd $R && ls -d commands.txt *.tail */results.json */metrics.jsonl */config.json */split.json 2>/dev/null)
for n in sup fm fm2x kd; do
  [ -f $R/$n/results.json ] && $PY -c "import json; r = json.load(open('$R/$n/results.json')); print('$n', round(100 * r['test_acc'], 2), r.get('trusted', ''))"
  [ -f $R/$n/metrics.jsonl ] && echo "$n last: $(tail -1 $R/$n/metrics.jsonl)"
done
tr '\r' '\n' < $R/peer.log | grep -E "top-1 acc|Error" | tail -4
tail -2 $R/tests_cuda.log 2>/dev/null
