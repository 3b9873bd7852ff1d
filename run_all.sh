#!/usr/bin/env bash
# run_all.sh: the paper's main table, resumably. FixMatch against KD-FixMatch on CIFAR10, SVHN,
# CIFAR100 and FOOD101 at 400, 1000, 2000 and 4000 labels with ImageNet-pretrained EfficientNet-B0
# (the paper's), over seeds, plus a compute-matched FixMatch the paper lacks; then a table and a plot.
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
# and run the same command again. Summary: $OUT_DIR/table.md and $OUT_DIR/table.png.
#
# Run:  bash run_all.sh --smoke             # digits on CPU: the whole machinery, 16 cells, ~2 min
#       bash run_all.sh                     # the paper's table (weeks of GPU time, see Cost)
#       bash run_all.sh --gpus 0,1,2,3      # one cell per GPU at a time
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
#   --gpus 0,1,..     GPUS        none: cells one after another on kdfixmatch.py's default device
#   --suave           SUAVE       0: add a Suave column (one more SNN training per seed)
#   --smoke                       the tiny configuration above (options given still win)
#   --print-commands              print the commands of unfinished cells, run nothing
#   --table                       write table.md / table.png from what has finished, run nothing
#                     PYTHON      python3 (the interpreter with torch; matplotlib optional)
#
# Cost: a cell is one SNN training of K steps (fixmatch; kd-ce and kd-sce: the inner SNN + DEC,
# the outer is the fixmatch cell's), or two (fixmatch-2x). At K = 2^20 one SNN training is days on
# one GPU (FixMatch's schedule; we have not timed EfficientNet-B0 at this K), so a (dataset, labels,
# seed) is 5 trainings and the full table 4 x 4 x 3 x 5 = 240. --smoke on a 2-core CPU: about 6 s
# per cell (half of it starting python), 1m34s in all. Exit status: 0 all done (or unavailable),
# 1 a cell failed or could not run, 2 bad options or a cell recorded with other --steps / --arch.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
die() { echo "run_all.sh: error: $*" >&2; exit 2; }
usage() { sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

# =============================================================================================
# Options: environment first, flags override, then the full-run or --smoke defaults
SMOKE=0 MODE=run EXTRA=()
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
        --gpus)           need "$@"; GPUS=$2; shift ;;
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
: "${DATA_DIR:=data}" "${OUT_DIR:=results}" "${GPUS:=}" "${PYTHON:=python3}"
DATASETS=${DATASETS//,/ } LABELS=${LABELS//,/ } GPUS=${GPUS//,/ }
posint() { [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"; }
for l in $LABELS; do posint --labels "$l"; done
posint --seeds "$SEEDS"; posint --steps "$STEPS"
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
    CMD=("$PY" "$REPO/kdfixmatch.py" "${how[@]}" --dataset "$d" --data-dir "$DATA_DIR"
         --labels "$l" --seed "$s" --arch "$ARCH" --steps "$steps")
    ((PRETRAINED)) && [[ $ARCH == efficientnet_b0 ]] && CMD+=(--pretrained)
    [[ -n $EVAL_EVERY ]] && CMD+=(--eval-every "$EVAL_EVERY")
    CMD+=("${EXTRA[@]}" --out "$(cell_dir "$@")")
}

json_num() {  # file key -> the top-level number (kdfixmatch.py writes JSON with indent=2)
    sed -n "s/^  \"$2\": \([-0-9.e]*\),\{0,1\}$/\1/p" "$1" 2>/dev/null | head -1
}

# =============================================================================================
# Summary: results/*/results.json -> table.md (+ table.png). Plain python, matplotlib optional.
summarise() {
    "$PY" - "$OUT_DIR" "$DATASETS" "$LABELS" "$SEEDS" "$STEPS" "$ARCH" "${METHODS[*]}" <<'PY'
import glob, json, os, statistics, sys

out, datasets, labels, seeds, steps, arch, configured = sys.argv[1:]
ALL = [("fixmatch", "FixMatch"), ("kd-ce", "KD-FixMatch (CE)"), ("kd-sce", "KD-FixMatch (SCE)"),
       ("fixmatch-2x", "FixMatch 2x steps"), ("suave", "Suave")]
SHORT = {"fixmatch": "FM", "kd-ce": "CE", "kd-sce": "SCE", "fixmatch-2x": "2x", "suave": "Suave"}
PAPER = {"cifar10": 2.44, "svhn": 5.81, "cifar100": 1.99, "food101": 3.88}  # at 4000 labels
NA = "–"

def read(path):
    try:
        return open(path).read().strip()
    except OSError:
        return None

# every cell on disk, plus the configured grid (so unstarted cells show as missing)
cells = {}                               # (dataset, labels, method) -> {seed: state dict}
for d_ in glob.glob(os.path.join(out, "*", "*", "*", "seed*")):
    d, l, m, s = os.path.relpath(d_, out).split(os.sep)
    if not l.isdigit() or not s[4:].isdigit() or m not in dict(ALL):
        continue
    res = read(os.path.join(d_, "results.json"))
    cells.setdefault((d, int(l), m), {})[int(s[4:])] = dict(
        res=json.loads(res) if res else None,
        started=os.path.exists(os.path.join(d_, "split.json")),
        failed=read(os.path.join(d_, "failed")), unavailable=read(os.path.join(d_, "unavailable")),
        dir=d_)
METHODS = [(m, n) for m, n in ALL if m in configured.split() or any(k[2] == m for k in cells)]
found_d = sorted({k[0] for k in cells} - set(datasets.split()))
rows = sorted({(d, int(l)) for d in datasets.split() for l in labels.split()}
              | {k[:2] for k in cells}, key=lambda r: ((datasets.split() + found_d).index(r[0]), r[1]))

def finished(d, l, m):
    return {s: c["res"] for s, c in cells.get((d, l, m), {}).items() if c["res"]}

def stat(xs, signed=False):
    f = "{:+.2f}" if signed else "{:.2f}"
    if len(xs) == 1:
        return f"{f.format(xs[0])} (n=1)"
    return f"{f.format(statistics.mean(xs))} ± {statistics.stdev(xs):.2f} (n={len(xs)})"

def acc(d, l, m):
    done = finished(d, l, m)
    if done:
        return stat([100 * r["test_acc"] for r in done.values()])
    states = cells.get((d, l, m), {}).values()
    return ("failed" if any(c["failed"] for c in states) else
            "running" if any(c["started"] for c in states) else NA)

def delta(d, l, a, b):                   # per-seed difference: a KD cell reuses its seed's outer
    A, B = finished(d, l, a), finished(d, l, b)
    xs = [100 * (A[s]["test_acc"] - B[s]["test_acc"]) for s in sorted(A.keys() & B.keys())]
    return stat(xs, signed=True) if xs else NA

def duration(sec):
    return f"{sec:.0f} s" if sec < 120 else f"{sec / 60:.0f} min" if sec < 7200 else f"{sec / 3600:.1f} h"

def wall(d, l):                          # a KD cell's cost includes the outer SNN it reused
    fm, parts = finished(d, l, "fixmatch"), []
    for m, short in ((m, SHORT[m]) for m in dict(METHODS)):
        done = finished(d, l, m)
        xs = [r["wall_s"] + (fm[s]["wall_s"] if m.startswith("kd") else 0)
              for s, r in done.items() if not m.startswith("kd") or s in fm]
        parts.append(f"{short} {duration(statistics.mean(xs))}" if xs else f"{short} {NA}")
    return ", ".join(parts) if finished(d, l, "fixmatch") or finished(d, l, "fixmatch-2x") else NA

def trusted(d, l):
    rs = list(finished(d, l, "kd-ce").values()) or list(finished(d, l, "kd-sce").values())
    ts = [r["trusted"] for r in rs if r.get("trusted")]
    if not ts:
        return NA, NA
    size = f"{statistics.mean(t['trusted_size'] for t in ts):.0f} / {ts[0]['unlabeled']}"
    prec = [100 * t["trusted_precision"] for t in ts if t["trusted_precision"] is not None]
    return size, (stat(prec) if prec else NA)

def paper(d, l):
    return "n/a" if d not in PAPER else f"+{PAPER[d]:.2f}" if l == 4000 else "unknown"

# what the rows are, as recorded in results.json where there are any
recorded = [r for (d, l, m), c in cells.items() for r in finished(d, l, m).values()]
archs = sorted({r["arch"] for r in recorded}) or [arch]
ks = sorted({r["steps"] for r in recorded if r["method"] == "kdfixmatch"}) or [int(steps)]
seeds_seen = sorted({r["seed"] for r in recorded})
head = [name for _, name in METHODS] + [
        "KD(CE) − FixMatch", "KD(SCE) − FixMatch", "KD(CE) − FixMatch 2x", "paper's gain",
        "trusted size", "trusted precision (%)", "wall time per cell"]
lines = [
    "# FixMatch vs KD-FixMatch: test accuracy (%)", "",
    f"Rows: datasets {', '.join(d for d in dict.fromkeys(r[0] for r in rows))}; labels "
    f"{', '.join(map(str, sorted({r[1] for r in rows})))}; arch {', '.join(archs)}; "
    f"K = {', '.join(map(str, ks))} steps per SNN; seeds 0..{int(seeds) - 1} configured"
    f"{', finished: ' + ', '.join(map(str, seeds_seen)) if seeds_seen else ''}.",
    "Accuracy: test accuracy of the final EMA model, mean ± sample std over the finished seeds "
    "(n = how many; `running` = started, not finished; `–` = not started).",
    "KD − FixMatch: mean ± std of the per-seed difference in accuracy points (a KD cell's outer "
    "SNN is the FixMatch cell of its seed). FixMatch 2x steps: FixMatch trained 2K steps, the "
    "SGD steps of KD-FixMatch's outer + inner SNNs (compute-matched; not in the paper).",
    "Paper's gain: the KD-FixMatch − FixMatch gain the paper reports at 4000 labels, in accuracy "
    "points; it gives no absolute accuracies and no other cells publicly (`unknown`; `n/a` = "
    "not a paper dataset). Trusted: the KD cells' trusted subset (after DEC) of the unlabeled set, "
    "size and pseudo-label precision. Wall time: mean of results.json's wall_s per cell (not "
    "counting Python's start); a KD cell's includes its reused FixMatch outer SNN.", "",
    "| dataset | labels | " + " | ".join(head) + " |", "|---|---:|" + "---:|" * len(head)]
unavailable, failed = {}, []
for (d, l, m), c in sorted(cells.items()):
    for s, st in sorted(c.items()):
        if st["unavailable"] and not any(finished(d, l_, m_) for d_, l_, m_ in cells if d_ == d):
            unavailable.setdefault(d, st["unavailable"].replace("kdfixmatch.py: error: ", ""))
        if st["failed"] and not st["res"]:
            failed.append((os.path.relpath(st["dir"], out), st["failed"].splitlines()[-1]))
for d, l in rows:
    if d in unavailable:
        if l == min(l_ for d_, l_ in rows if d_ == d):    # one row for the whole dataset
            lines.append(f"| {d} | all | unavailable offline: {unavailable[d]} |"
                         + " |" * (len(head) - 1))
        continue
    lines.append(f"| {d} | {l} | " + " | ".join(
        [acc(d, l, m) for m in dict(METHODS)] + [delta(d, l, "kd-ce", "fixmatch"),
         delta(d, l, "kd-sce", "fixmatch"), delta(d, l, "kd-ce", "fixmatch-2x"), paper(d, l),
         *trusted(d, l), wall(d, l)]) + " |")
if failed:
    lines += ["", "Failed cells (see run.log in the cell's directory):"]
    lines += [f"- `{p}`: {msg}" for p, msg in failed]

# the plot: accuracy against label count, one panel per dataset, one line per method
plotted = [d for d in dict.fromkeys(r[0] for r in rows)
           if any(finished(d, l, m) for d_, l in rows if d_ == d for m in dict(METHODS))]
png, note = os.path.join(out, "table.png"), None
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    note = "table.png not written: matplotlib is not installed (pip install matplotlib)."
if note is None and not plotted:
    note = "table.png not written: no cell has finished yet."
if note is None:
    fig, axes = plt.subplots(1, len(plotted), figsize=(4.5 * len(plotted), 3.6), squeeze=False)
    for ax, d in zip(axes[0], plotted):
        for m, name in METHODS:
            pts = [(l, [100 * r["test_acc"] for r in finished(d, l, m).values()])
                   for d_, l in rows if d_ == d and finished(d, l, m)]
            if pts:
                ax.errorbar([p[0] for p in pts], [statistics.mean(p[1]) for p in pts],
                            [statistics.stdev(p[1]) if len(p[1]) > 1 else 0 for p in pts],
                            marker="o", capsize=3, label=name)
        ls = sorted({l for d_, l in rows if d_ == d})
        ax.set(xscale="log", title=d, xlabel="labels", ylabel="test accuracy (%)")
        ax.set_xticks(ls, [str(l) for l in ls])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png + ".tmp.png", dpi=120)
    os.replace(png + ".tmp.png", png)
else:
    if os.path.exists(png):
        os.remove(png)                   # a plot of older results would mislead
    lines += ["", f"Note: {note}"]
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "table.md.tmp"), "w") as f:
    f.write("\n".join(lines) + "\n")
os.replace(os.path.join(out, "table.md.tmp"), os.path.join(out, "table.md"))
print("\n".join(lines))
print(f"\nwrote {os.path.join(out, 'table.md')}" + (f" and {png}" if note is None else f"\n{note}"))
PY
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

SLOTS=(${GPUS:-cpu-or-default})             # slot name = the GPU id given to CUDA_VISIBLE_DEVICES
if [[ -n $GPUS && " ${EXTRA[*]} " != *" --workers "* ]]; then  # share the CPU between the cells
    EXTRA+=(--workers $(($(nproc) / ${#SLOTS[@]} > 0 ? $(nproc) / ${#SLOTS[@]} : 1)))
fi

count_done() { local n=0 c; for c in "${CELLS[@]}"; do is_done $c && n=$((n + 1)); done; echo $n; }
log() { echo "[$(date +%H:%M:%S)] $*"; }

run_cell() {  # index slot: runs in the background; the outcome is left in the cell's directory
    local i=$1 slot=$2 d l m s
    read -r d l m s <<<"${CELLS[i]}"
    local dir resume="" py rc t0=$SECONDS
    dir=$(cell_dir $d $l $m $s)
    mkdir -p "$dir" && rm -f "$dir/failed" "$dir/unavailable"
    [[ -f $dir/split.json ]] && resume=--resume
    cell_cmd $d $l $m $s
    printf '\n==== run_all.sh %s: %s\n' "$(date)" "${CMD[*]} $resume" >>"$dir/run.log"
    log "[$((i + 1))/$N] $d $l $m seed$s ... ${resume:+resume from checkpoint, }start" \
        "${GPUS:+on GPU $slot }(tail -f ${dir#"$PWD"/}/run.log)"
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
    elif ((rc == 2)) && tail -n 3 "$dir/run.log" | grep -q "error: --dataset $d: not found"; then
        tail -n 3 "$dir/run.log" | grep "error: --dataset $d: not found" | tail -1 >"$dir/unavailable"
        log "[$((i + 1))/$N] $d $l $m seed$s ... dataset unavailable: $(cat "$dir/unavailable")"
    else
        { echo "exit status $rc; last lines of run.log:"; tail -n 20 "$dir/run.log" | tr '\r' '\n' \
            | grep -v '^\s*$' | tail -n 5; } >"$dir/failed"
        log "[$((i + 1))/$N] $d $l $m seed$s ... FAILED (exit $rc, $took): $(tail -n 1 "$dir/failed")"
    fi
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
log "$(count_done) done, ${#pending[@]} to go; ${#SLOTS[@]} at a time; results in $OUT_DIR"

next_cell() {  # -> NEXT: the first pending cell that can start now (-1: none); drops dead cells
    local keep=() i d l m s
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
        if ((NEXT < 0)); then NEXT=$i; else keep+=("$i"); fi
    done
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
