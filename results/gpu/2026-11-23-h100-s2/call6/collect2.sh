#!/bin/bash
# Poll the background work until it all ends or W s after T0, then pack what exists into $OUT.
W=$1; T0=${2:-$(date +%s)}; R=/tmp/runs; O=${OUT:-/tmp/out}; PY=${PY:-python3}
[ -d $R ] || { echo "no runs on this machine (it was restarted)"; exit 0; }
busy() { pgrep -f "peer_kekmodel|kdfixmatch.py --method|pytest -q" > /dev/null; }
while [ $(( $(date +%s) - T0 )) -lt $W ] && busy; do sleep 10; done
echo "[$(( $(date +%s) - T0 )) s] finished: $(ls $R/*/results.json 2>/dev/null | tr '\n' ' '); still running: $(pgrep -fa 'peer_kekmodel|kdfixmatch.py --method|pytest -q' | grep -v pgrep | cut -c1-80 | tr '\n' ';')" | tee -a $O/timeline.txt
for f in $R/*.log; do tr '\r' '\n' < $f | grep -v -E "^\s*$|decode" | tail -300 > $f.tail; done
tar -czf $O/runs.tgz -C $R $(cd $R && ls -d commands.txt *.tail */results.json */metrics.jsonl */config.json */split.json 2>/dev/null)
for n in $R/*/; do n=$(basename $n)
  [ -f $R/$n/results.json ] && $PY -c "import json; r = json.load(open('$R/$n/results.json')); print('$n', round(100 * r['test_acc'], 2), 'train_s', r.get('outer', {}).get('train_s'))"
  [ -f $R/$n/metrics.jsonl ] && echo "$n last: $(tail -1 $R/$n/metrics.jsonl)"
done
tr '\r' '\n' < $R/peer.log 2>/dev/null | grep -E "top-1 acc|Error" | tail -3
tr '\r' '\n' < $R/peer.log 2>/dev/null | grep -E "Batch:" | tail -1 | cut -c1-160
tail -3 $R/tests_cuda.log 2>/dev/null
