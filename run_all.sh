#!/usr/bin/env bash
# run_all.sh: the paper's main table, resumably. FixMatch against KD-FixMatch on CIFAR10, SVHN,
# CIFAR100 and FOOD101 at 400, 1000, 2000 and 4000 labels with ImageNet-pretrained EfficientNet-B0
# (the paper's), over seeds, plus a compute-matched FixMatch the paper lacks; then a table, plots.
#
# Every cell (dataset, labels, method, seed) is one `kdfixmatch.py --out DIR` run, with K steps/SNN:
#   fixmatch     --method fixmatch   --steps K        also the outer SNN of the seed's two KD cells
#   kd-ce        --method kdfixmatch --steps K --loss ce  --outer-from <that fixmatch cell>
#   kd-sce       --method kdfixmatch --steps K --loss sce --outer-from <that fixmatch cell>
#   fixmatch-2x  --method fixmatch   --steps 2K       as many SGD steps as KD's outer + inner: is
#                                                     a gain the method's, or twice the training's?
#   suave        --method suave      --steps K        only with --suave: the second source document
# DIR = $OUT_DIR/<dataset>/<labels>/<method>/seed<s>/ (results.json, checkpoints, run.log).
# A cell with results.json is skipped, a started one resumed from its checkpoint (--resume), a
# dataset that cannot be found or downloaded becomes an "unavailable" row. Interrupt at any time
# and run the same command again. Each cell is locked (flock) while it runs: a second sweep on
# the same --out-dir runs the other cells and waits for the locked ones, then skips them.
# Summary (report.py): $OUT_DIR/table.md; table.png, accuracy against labels; curves.png, test
# accuracy against step; paired.png, each seed's KD-FixMatch minus FixMatch and FixMatch 2x.
#
# Run:  bash run_all.sh --smoke             # digits on CPU: the whole machinery, 16 cells, ~2 min
#       bash run_all.sh                     # the paper's table (weeks of GPU time, see Cost)
#       bash run_all.sh --gpus 0,1,2,3      # one cell per GPU at a time
#       bash run_all.sh --gpus 0,1,2,3 --gpus-per-cell 2   # two cells at a time, each on 2 GPUs
#       bash run_all.sh --print-commands    # one line per unfinished cell: SLURM array, parallel
#       bash run_all.sh --table             # summarise what has finished so far, train nothing
#       bash run_all.sh ... -- --weights effnet_b0.pth   # after --: passed to every kdfixmatch.py
#
# Options (flag, or environment variable; the default, then the --smoke default):
#   --datasets "A B"  DATASETS    cifar10 svhn cifar100 food101 | digits
#   --labels "N M"    LABELS      400 1000 2000 4000            | 20 50
#   --seeds N         SEEDS       3 (seeds 0..N-1)              | 2
#   --steps K         STEPS       1048576 = 2^20 (the paper's)  | 60
#   --eval-every N    EVAL_EVERY  kdfixmatch.py's (1024)        | 30
#   --arch A          ARCH        efficientnet_b0               | small_cnn
#   --no-pretrained   PRETRAINED  1: --pretrained (ImageNet weights; offline: -- --weights FILE) | 0
#   --data-dir DIR    DATA_DIR    data
#   --out-dir DIR     OUT_DIR     results                       | results-smoke
#   --gpus 0,1,..     GPUS        none: cells one after another on kdfixmatch.py's default device;
#                                 else GPU indices (nvidia-smi's), each once, that exist here
#   --gpus-per-cell N GPUS_PER_CELL  1: each cell one python process. N > 1: each cell one
#                                 torchrun of N processes (`$PYTHON -m torch.distributed.run
#                                 --standalone --nproc_per_node N`; B, mu stay the global batch);
#                                 with --gpus, the GPUs in groups of N (their count a multiple of
#                                 N), one cell per group at a time; without, one cell at a time on
#                                 GPUs 0..N-1 (on a machine without CUDA, N CPU processes). A cell
#                                 resumes only on the number of processes it started with.
#   --suave           SUAVE       0: add a Suave column (one more SNN training per seed)
#   --smoke                       the tiny configuration above (options given still win)
#   --print-commands              print the commands of unfinished cells, run nothing (N > 1:
#                                 torchrun lines). The lines name no GPU: the scheduler that runs
#                                 them (SLURM, or CUDA_VISIBLE_DEVICES per job) gives each its GPUs
#   --table                       write table.md and the plots from what has finished, run nothing
#                     PYTHON      python3 (the interpreter with torch; matplotlib optional)
#
# Cost: a cell is one SNN training of K steps (fixmatch; kd-ce and kd-sce: the inner SNN + DEC,
# the outer is the fixmatch cell's), or two (fixmatch-2x). At K = 2^20 one SNN training is days on
# one GPU (FixMatch's schedule; we have not timed EfficientNet-B0 at this K), so a (dataset, labels,
# seed) is 5 trainings and the full table 4 x 4 x 3 x 5 = 240. --smoke on a 2-core CPU: about 6 s
# per cell (half of it starting python), 1m34s in all. Exit status: 0 all done (or unavailable),
# 1 a cell failed or could not run, 2 bad options or a cell recorded with other --steps / --arch.
# Needs bash 4.3+ and flock (util-linux).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
die() { echo "run_all.sh: error: $*" >&2; exit 2; }
usage() { sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

# =============================================================================================
# Options: environment first, flags override, then the full-run or --smoke defaults
SMOKE=0 MODE=run EXTRA=() GPUS_GIVEN=${GPUS:+1}
need() { (($# >= 2)) || die "$1 needs a value"; }
while (($#)); do
    case $1 in
        --datasets)       need "$@"; DATASETS=$2; shift ;;
        --labels)         need "$@"; LABELS=$2; shift ;;
        --seeds)          need "$@"; SEEDS=$2; shift ;;
        --steps)          need "$@"; STEPS=$2; shift ;;
        --eval-every)     need "$@"; EVAL_EVERY=$2; shift ;;
        --arch)           need "$@"; ARCH=$2; shift ;;
        --no-pretrained)  PRETRAINED=0 ;;
        --suave)          SUAVE=1 ;;
        --data-dir)       need "$@"; DATA_DIR=$2; shift ;;
        --out-dir)        need "$@"; OUT_DIR=$2; shift ;;
        --gpus)           need "$@"; GPUS=$2; GPUS_GIVEN=1; shift ;;
        --gpus-per-cell)  need "$@"; GPUS_PER_CELL=$2; shift ;;
        --smoke)          SMOKE=1 ;;
        --print-commands) MODE=print ;;
        --table)          MODE=table ;;
        -h|--help)        usage; exit 0 ;;
        --)               shift; EXTRA=("$@"); break ;;
        *)                die "unknown option $1 (see --help)" ;;
    esac
    shift
done
if ((SMOKE)); then
    : "${DATASETS:=digits}" "${LABELS:=20 50}" "${SEEDS:=2}" "${STEPS:=60}" "${EVAL_EVERY:=30}"
    : "${ARCH:=small_cnn}" "${PRETRAINED:=0}" "${OUT_DIR:=results-smoke}"
fi
: "${DATASETS:=cifar10 svhn cifar100 food101}" "${LABELS:=400 1000 2000 4000}" "${SEEDS:=3}"
: "${STEPS:=1048576}" "${EVAL_EVERY:=}" "${ARCH:=efficientnet_b0}" "${PRETRAINED:=1}"
: "${DATA_DIR:=data}" "${OUT_DIR:=results}" "${GPUS:=}" "${GPUS_PER_CELL:=1}" "${PYTHON:=python3}"
DATASETS=${DATASETS//,/ } LABELS=${LABELS//,/ }
posint() { [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"; }
for l in $LABELS; do posint --labels "$l"; done
posint --seeds "$SEEDS"; posint --steps "$STEPS"; posint --gpus-per-cell "$GPUS_PER_CELL"
[[ -z $EVAL_EVERY ]] || posint --eval-every "$EVAL_EVERY"
[[ -n ${DATASETS// } && -n ${LABELS// } ]] || die "--datasets and --labels must not be empty"
for d in $DATASETS; do        # kdfixmatch.py's choices: a typo fails here, not in every cell
    [[ $d == @(digits|cifar10|cifar100|svhn|food101|folder) ]] || die "--datasets: unknown '$d'"
done
[[ $ARCH == @(small_cnn|wrn28_2|wrn28_8|efficientnet_b0) ]] || die "--arch: unknown '$ARCH'"
[[ $PRETRAINED == [01] ]] || die "PRETRAINED must be 0 or 1, got '$PRETRAINED'"
PY=$(command -v "$PYTHON") || die "PYTHON=$PYTHON: not found (set PYTHON to the python with torch)"
OUT_DIR=$(realpath -m "$OUT_DIR") DATA_DIR=$(realpath -m "$DATA_DIR")
METHODS=(fixmatch kd-ce kd-sce fixmatch-2x)
[[ ${SUAVE:-0} == [01] ]] || die "SUAVE must be 0 or 1, got '$SUAVE'"
((${SUAVE:-0})) && METHODS+=(suave)
# --gpus: CUDA device indices, each once (one slot per GPU, or per --gpus-per-cell GPUs). Junk
# must not run on the CPU, and a GPU named twice would be in two slots; that they exist is
# checked before running (gpu_count).
ids=()
if [[ -n $GPUS_GIVEN ]]; then
    sep='[[:space:]]*[,[:space:]][[:space:]]*'
    [[ $GPUS =~ ^[[:space:]]*[0-9]+($sep[0-9]+)*[[:space:]]*$ ]] || die "--gpus '$GPUS': not a" \
        "list of GPU indices; give them as nvidia-smi numbers them, e.g. --gpus 0,1 (or leave" \
        "--gpus out to run one cell at a time on kdfixmatch.py's default device)"
    for id in ${GPUS//,/ }; do
        [[ " ${ids[*]} " != *" $((10#$id)) "* ]] || die "--gpus '$GPUS': GPU $((10#$id)) is" \
            "named twice; name each GPU once (one cell runs on each)"
        ids+=("$((10#$id))")
    done
    ((${#ids[@]} % GPUS_PER_CELL == 0)) || die "--gpus '$GPUS': ${#ids[@]} GPU(s) do not make" \
        "cells of --gpus-per-cell $GPUS_PER_CELL; name a multiple of $GPUS_PER_CELL GPUs"
    GPUS=${ids[*]}
fi
CELL_GPUS=()                        # --gpus in groups of N, a cell's: "0,1" "2,3" (N = 1: "0" "1")
for ((g = 0; g < ${#ids[@]}; g += GPUS_PER_CELL)); do
    group=${ids[*]:g:GPUS_PER_CELL}
    CELL_GPUS+=("${group// /,}")
done
# --gpus-per-cell N > 1: each cell is a torchrun of N processes, called through the interpreter
# (a `torchrun` on PATH may belong to another python).
TORCHRUN=()
if ((GPUS_PER_CELL > 1)) && [[ $MODE != table ]]; then
    "$PY" -c 'import torch.distributed.run' 2>/dev/null || die "--gpus-per-cell" \
        "$GPUS_PER_CELL needs torchrun, but $PY cannot import torch.distributed.run; set PYTHON" \
        "to the python with torch"
    TORCHRUN=(-m torch.distributed.run --standalone --nproc_per_node "$GPUS_PER_CELL")
fi

# =============================================================================================
# Cells: the grid in run order (a seed's fixmatch first: its two KD cells reuse it as outer SNN)
CELLS=()
for d in $DATASETS; do for l in $LABELS; do for ((s = 0; s < SEEDS; s++)); do
    for m in "${METHODS[@]}"; do CELLS+=("$d $l $m $s"); done
done; done; done
N=${#CELLS[@]}

cell_dir() { echo "$OUT_DIR/$1/$2/$3/seed$4"; }
outer_dir() { cell_dir "$1" "$2" fixmatch "$4"; }
is_done() { [[ -f $(cell_dir "$@")/results.json ]]; }
is_kd() { [[ $3 == kd-* ]]; }

cell_cmd() {  # d l m s -> CMD: the kdfixmatch.py command line of the cell (without --resume)
    local d=$1 l=$2 m=$3 s=$4 steps=$STEPS
    local -a how=(--method fixmatch)
    case $m in
        kd-ce|kd-sce) how=(--method kdfixmatch --loss "${m#kd-}" --outer-from "$(outer_dir "$@")") ;;
        fixmatch-2x)  steps=$((2 * STEPS)) ;;
        suave)        how=(--method suave) ;;
    esac
    CMD=("$PY" "${TORCHRUN[@]}" "$REPO/kdfixmatch.py" "${how[@]}" --dataset "$d"
         --data-dir "$DATA_DIR" --labels "$l" --seed "$s" --arch "$ARCH" --steps "$steps")
    ((PRETRAINED)) && [[ $ARCH == efficientnet_b0 ]] && CMD+=(--pretrained)
    [[ -n $EVAL_EVERY ]] && CMD+=(--eval-every "$EVAL_EVERY")
    CMD+=("${EXTRA[@]}" --out "$(cell_dir "$@")")
}

json_num() {  # file key -> the top-level number (kdfixmatch.py writes JSON with indent=2)
    sed -n "s/^  \"$2\": \([-0-9.e]*\),\{0,1\}$/\1/p" "$1" 2>/dev/null | head -1
}

# =============================================================================================
# Summary: the cells on disk -> table.md, table.png, curves.png, paired.png (report.py)
summarise() {
    "$PY" "$REPO/report.py" --out-dir "$OUT_DIR" --datasets "$DATASETS" --labels "$LABELS" \
        --seeds "$SEEDS" --steps "$STEPS" --arch "$ARCH" --methods "${METHODS[*]}"
}

if [[ $MODE == table ]]; then summarise; exit; fi

# =============================================================================================
# --print-commands: one self-contained line per unfinished cell, for a scheduler
if [[ $MODE == print ]]; then
    waiting=0
    for phase in 1 2; do            # phase 1: fixmatch + fixmatch-2x; 2: KD whose outer is done
        for c in "${CELLS[@]}"; do
            read -r d l m s <<<"$c"
            is_done $d $l $m $s && continue
            if is_kd $d $l $m $s; then
                ((phase == 2)) || continue
                [[ -f $(outer_dir $d $l $m $s)/results.json ]] || { waiting=$((waiting + 1)); continue; }
            else
                ((phase == 1)) || continue
            fi
            cell_cmd $d $l $m $s
            dir=$(printf %q "$(cell_dir $d $l $m $s)")
            # --resume is decided when the line runs, so a requeued job continues its checkpoint
            echo "mkdir -p $dir && $(printf '%q ' "${CMD[@]}")\$(test -f $dir/split.json && echo --resume) >> $dir/run.log 2>&1"
        done
    done
    ((waiting)) && echo "run_all.sh: $waiting KD cells wait for their fixmatch cell (outer SNN);" \
        "run --print-commands again once those have finished" >&2
    exit 0
fi

# =============================================================================================
# Running: a pool with one slot per GPU (or one slot), each slot one cell at a time
[[ -f $REPO/kdfixmatch.py ]] || die "kdfixmatch.py not found beside run_all.sh"
for c in "${CELLS[@]}"; do                  # a finished cell must match the configuration
    read -r d l m s <<<"$c"
    cfg=$(cell_dir $d $l $m $s)/config.json
    [[ -f $cfg ]] || continue
    want=$STEPS; [[ $m == fixmatch-2x ]] && want=$((2 * STEPS))
    got=$(json_num "$cfg" steps)
    [[ $got == "$want" ]] || die "$(dirname "$cfg") was run with --steps $got, not $want;" \
        "choose another --out-dir (or the same --steps)"
    grep -q "^  \"arch\": \"$ARCH\"" "$cfg" || die "$(dirname "$cfg") was run with another" \
        "--arch than $ARCH; choose another --out-dir"
done

command -v flock >/dev/null || die "flock not found: install util-linux (it locks each cell)"
gpu_count() {  # the CUDA GPUs here, numbered as a cell's CUDA_VISIBLE_DEVICES numbers them
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU '
    else
        env -u CUDA_VISIBLE_DEVICES "$PY" -c 'import torch; print(torch.cuda.device_count())' \
            2>/dev/null || echo 0
    fi
}
if [[ -n $GPUS ]]; then
    ngpu=$(gpu_count) have="no CUDA GPU here"
    ((ngpu > 0)) && have="the CUDA GPUs here are 0..$((ngpu - 1))"
    for id in $GPUS; do
        ((id < ngpu)) || die "--gpus: there is no GPU $id ($have); name GPUs that exist, or" \
            "leave --gpus out to run on the CPU"
    done
    # A cell that cannot use its GPU then fails, rather than training on the CPU unnoticed.
    [[ " ${EXTRA[*]} " == *" --device"* ]] || EXTRA+=(--device cuda)
fi
mkdir -p "$OUT_DIR" 2>/dev/null && [[ -w $OUT_DIR ]] || die "--out-dir $OUT_DIR: cannot write" \
    "there; choose another --out-dir"
# A slot's name is the GPUs given to CUDA_VISIBLE_DEVICES: "0", or with --gpus-per-cell "0,1".
SLOTS=("${CELL_GPUS[@]:-cpu-or-default}")
if [[ (-n $GPUS || GPUS_PER_CELL -gt 1) && " ${EXTRA[*]} " != *" --workers "* ]]; then
    procs=$((${#SLOTS[@]} * GPUS_PER_CELL))  # share the CPU between the cells' processes
    EXTRA+=(--workers $(($(nproc) / procs > 0 ? $(nproc) / procs : 1)))
fi

count_done() { local n=0 c; for c in "${CELLS[@]}"; do is_done $c && n=$((n + 1)); done; echo $n; }
log() { echo "[$(date +%H:%M:%S)] $*"; }

run_cell() {  # index slot: runs in the background; the outcome is left in the cell's directory
    local i=$1 slot=$2 d l m s
    read -r d l m s <<<"${CELLS[i]}"
    local dir resume="" py rc t0=$SECONDS lock
    dir=$(cell_dir $d $l $m $s)
    if ! mkdir -p "$dir"; then
        log "[$((i + 1))/$N] $d $l $m seed$s ... not run: cannot create $dir"
        return
    fi
    # One sweep at a time runs a cell: a second run_all.sh on this --out-dir waits for the first
    # to finish it (and then skips it) instead of starting kdfixmatch.py on a run directory that
    # is in use, which used to fail and leave a failure mark beside the first one's results.
    # The kernel drops the lock when its holder dies (kdfixmatch.py inherits it), so none is stale.
    exec {lock}>>"$dir/run_all.lock"
    if ! flock -n "$lock"; then
        log "[$((i + 1))/$N] $d $l $m seed$s ... another run_all.sh is running it; waiting"
        flock "$lock"
    fi
    if [[ -f $dir/results.json ]]; then
        log "[$((i + 1))/$N] $d $l $m seed$s ... done (by another run_all.sh)"
        return
    fi
    rm -f "$dir/failed" "$dir/unavailable"
    [[ -f $dir/split.json ]] && resume=--resume
    cell_cmd $d $l $m $s
    printf '\n==== run_all.sh %s: %s\n' "$(date)" "${CMD[*]} $resume" >>"$dir/run.log"
    local from where=${GPUS:+"on GPU $slot "}
    from=$(($(stat -c %s "$dir/run.log") + 1))     # this attempt's output: tail -c +$from
    if ((GPUS_PER_CELL > 1)); then
        where="on ${GPUS:+"GPUs $slot, "}$GPUS_PER_CELL processes "
    fi
    log "[$((i + 1))/$N] $d $l $m seed$s ... ${resume:+resume from checkpoint, }start" \
        "$where(tail -f ${dir#"$PWD"/}/run.log)"
    if [[ -n $GPUS ]]; then
        CUDA_VISIBLE_DEVICES=$slot "${CMD[@]}" $resume >>"$dir/run.log" 2>&1 &
    else
        "${CMD[@]}" $resume >>"$dir/run.log" 2>&1 &
    fi
    py=$!
    trap 'kill $py 2>/dev/null; wait $py; exit 143' TERM
    wait $py; rc=$?
    local took=$(((SECONDS - t0) / 60))m$(((SECONDS - t0) % 60))s
    if ((rc == 0)) && [[ -f $dir/results.json ]]; then
        log "[$((i + 1))/$N] $d $l $m seed$s ... done" \
            "$(awk '{printf "%.2f%%", 100 * $1}' <<<"$(json_num "$dir/results.json" test_acc)") ($took)"
    elif ((GPUS_PER_CELL > 1)); then
        torchrun_failed "$dir" "$from" "$d" "$rc" "[$((i + 1))/$N] $d $l $m seed$s ..." "$took"
    elif ((rc == 2)) && tail -n 3 "$dir/run.log" | grep -q "error: --dataset $d: not found"; then
        tail -n 3 "$dir/run.log" | grep "error: --dataset $d: not found" | tail -1 >"$dir/unavailable"
        log "[$((i + 1))/$N] $d $l $m seed$s ... dataset unavailable: $(cat "$dir/unavailable")"
    else
        { echo "exit status $rc; last lines of run.log:"; tail -n 20 "$dir/run.log" | tr '\r' '\n' \
            | grep -v '^\s*$' | tail -n 5; } >"$dir/failed"
        log "[$((i + 1))/$N] $d $l $m seed$s ... FAILED (exit $rc, $took): $(tail -n 1 "$dir/failed")"
    fi
}

torchrun_failed() {  # dir from d rc what took: a torchrun cell that failed, like run_cell's own
    # torchrun exits 1 whatever its worker's status, after its own report (ChildFailedError and
    # its traceback): the cause is our line above that, `kdfixmatch.py: ...`, or the lines there.
    local dir=$1 d=$3 rc=$4 what=$5 took=$6 out ours worker
    out=$(tail -c +"$2" "$dir/run.log" | tr '\r' '\n' | grep -v '^\s*$' \
          | grep -v '^\**$\|^Setting OMP_NUM_THREADS')   # (torchrun's banner at its start)
    ours=$(grep '^kdfixmatch\.py: ' <<<"$out" | tail -n 1)
    if [[ $ours == "kdfixmatch.py: error: --dataset $d: not found"* ]]; then
        echo "$ours" >"$dir/unavailable"
        log "$what dataset unavailable: $ours"
        return
    fi
    worker=$(sed -n '/^Root Cause/,$p' <<<"$out" | grep -m 1 -o 'exitcode *: *-\{0,1\}[0-9]*' \
             | grep -o -- '-\{0,1\}[0-9]*$')
    { echo "exit status $rc${worker:+ (torchrun; its failed worker: $worker)}; last lines" \
          "of run.log:"
      sed '/torch\/distributed\/elastic\//,$d' <<<"$out" | tail -n 5 | grep -vxF -- "$ours"
      [[ -z $ours ]] || echo "$ours"; } >"$dir/failed"
    log "$what FAILED (exit $rc, $took): $(tail -n 1 "$dir/failed")"
}

declare -A PID=() AT=()                     # slot -> running pid, slot -> cell index
stop() {
    log "interrupted: stopping ${#PID[@]} running cell(s); run the same command again to resume"
    for slot in "${!PID[@]}"; do kill -TERM -- "-${PID[$slot]}" 2>/dev/null; done
    wait
    exit 130
}
trap stop INT TERM HUP

pending=() unavail=" " ended_bad=" " nblocked=0
for ((i = 0; i < N; i++)); do
    if is_done ${CELLS[i]}; then
        read -r d l m s <<<"${CELLS[i]}"
        log "[$((i + 1))/$N] $d $l $m seed$s ... skip (finished)"
    else
        pending+=("$i")
    fi
done
each=""
if ((GPUS_PER_CELL > 1)); then
    each=" (each a torchrun of $GPUS_PER_CELL processes)"
fi
log "$(count_done) done, ${#pending[@]} to go; ${#SLOTS[@]} at a time$each; results in $OUT_DIR"

is_busy() {  # d l m s: another run_all.sh holds the cell's lock (it is running the cell)
    local f
    f=$(cell_dir "$@")/run_all.lock
    [[ -f $f ]] && ! flock -n "$f" true
}

next_cell() {  # -> NEXT: the first pending cell that can start now (-1: none); drops dead cells
    local keep=() i d l m s busy=-1
    NEXT=-1
    for i in "${pending[@]}"; do
        read -r d l m s <<<"${CELLS[i]}"
        if [[ $unavail == *" $d "* ]]; then
            log "[$((i + 1))/$N] $d $l $m seed$s ... skip (dataset $d unavailable)"; continue
        fi
        if is_kd $d $l $m $s && ! is_done $d $l fixmatch $s; then
            if [[ $ended_bad == *" $(outer_dir $d $l $m $s) "* ]]; then
                log "[$((i + 1))/$N] $d $l $m seed$s ... skip (its fixmatch cell failed)"
                nblocked=$((nblocked + 1)); continue
            fi
            keep+=("$i"); continue          # waits while its outer cell is pending or running
        fi
        if ((NEXT < 0)) && ! is_busy $d $l $m $s; then
            NEXT=$i
        else
            ((busy >= 0 || NEXT >= 0)) || busy=$i   # another sweep runs it: others first
            keep+=("$i")
        fi
    done
    if ((NEXT < 0 && busy >= 0)); then          # only busy cells can start: wait for one
        NEXT=$busy
        pending=("${keep[@]}") keep=()
        for i in "${pending[@]}"; do [[ $i == "$busy" ]] || keep+=("$i"); done
    fi
    pending=("${keep[@]}")
}

while :; do
    for slot in "${SLOTS[@]}"; do           # fill the free slots
        [[ -n ${PID[$slot]-} ]] && continue
        next_cell
        ((NEXT >= 0)) || break
        set -m                              # the cell in its own process group (python and its
        run_cell "$NEXT" "$slot" &          # workers): stop() ends it whole, with or without a
        PID[$slot]=$! AT[$slot]=$NEXT       # terminal (setsid, a scheduler)
        set +m
    done
    ((${#PID[@]})) || break                 # nothing running and nothing can start
    wait -n
    for slot in "${!PID[@]}"; do            # free the slots whose cell has ended
        kill -0 "${PID[$slot]}" 2>/dev/null && continue
        dir=$(cell_dir ${CELLS[${AT[$slot]}]})
        d=${CELLS[${AT[$slot]}]%% *}
        [[ -f $dir/unavailable && $unavail != *" $d "* ]] && unavail+="$d "
        [[ -f $dir/results.json ]] || ended_bad+="$dir "
        [[ -d $dir ]] || nblocked=$((nblocked + 1))
        unset "PID[$slot]" "AT[$slot]"
        log "$(count_done) done, $((${#pending[@]} + ${#PID[@]})) to go"
    done
done
trap - INT TERM HUP

summarise
nfail=0
for c in "${CELLS[@]}"; do
    [[ -f $(cell_dir $c)/failed && ! -f $(cell_dir $c)/results.json ]] && nfail=$((nfail + 1))
done
for i in "${pending[@]}"; do log "not run: ${CELLS[i]}"; done    # (cannot happen; never silent)
((nfail + nblocked + ${#pending[@]} == 0)) || {
    log "$nfail cell(s) failed, $((nblocked + ${#pending[@]})) not run: see 'failed' and run.log" \
        "in their directories, then run the same command again"; exit 1; }
[[ $unavail == " " ]] || log "unavailable offline:$unavail(see table.md); all other cells done"
