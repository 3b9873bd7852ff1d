"""KD-FixMatch in one readable script.

A FixMatch network (the outer SNN) labels the unlabeled set; its confident labels that deep
embedding clustering agrees with form a trusted subset; a fresh FixMatch network (the inner SNN)
then trains with those labels as a fallback target (Heuristic 1).

Paper:      KD-FixMatch: Knowledge Distillation Siamese Neural Networks, Wang et al., ICIP 2023,
            arXiv 2309.05826. It has no public code; where its text does not settle a detail,
            the comment says "our reading".
Built on:   FixMatch (Sohn et al. 2020; official code google-research/fixmatch, PyTorch port
            kekmodel/FixMatch-pytorch), DEC (Xie et al. 2016), symmetric cross entropy
            (Wang et al. 2019), and Suave (Fini et al. 2023) as a second baseline.
Run:        python kdfixmatch.py                          # digits on a CPU, under a minute
            python kdfixmatch.py --dataset cifar10 --labels 4000
            python kdfixmatch.py --dataset folder --data-dir DIR   # any ImageFolder train/ test/
            torchrun --standalone --nproc_per_node 4 kdfixmatch.py --dataset cifar10   # 4 GPUs
Claim:      the paper reports KD-FixMatch beating FixMatch at 4000 labels by +2.44 (CIFAR-10),
            +5.81 (SVHN), +1.99 (CIFAR-100) and +3.88 (Food-101) accuracy points. What we measured
            is in RESULTS.md, with commands and machines; results.json records every number a run
            makes.

The file reads as the paper's method section: hyper-parameters, the command line (checked before
torch is imported, so a typo costs no import), data, augmentation, models, the FixMatch step,
high-confidence sampling and DEC, the inner SNN's loss, Suave, training one SNN, the pipeline.
The run's machinery (output directory, lock, checkpoints, resume, metrics) comes last.
Under torchrun (DistributedDataParallel) the recipe is the same: B and mu are the global batch,
each process trains on its share, and rank 0 alone evaluates and writes.
"""

import argparse
import collections
import concurrent.futures
import copy
import ctypes
import datetime
import errno
import fcntl
import functools
import hashlib
import importlib.util
import io
import json
import math
import os
import re
import shlex
import socket
import stat
import sys
import time

# ==== Hyper-parameters ===========================================================================
# FixMatch's recipe, from the official code and the paper's Table 4 (Sohn et al. 2020). A dataset
# row below overrides a few of them. None means "the dataset decides" (image_size: native size).
FIXMATCH = dict(
    labels=4000,  # the number of labeled images, class-balanced
    arch="wrn28_2",  # WRN-28-2, FixMatch's CIFAR-10 and SVHN backbone
    steps=2**20,  # K, optimizer steps per SNN
    batch_size=64,  # B, labeled images per step
    mu=7,  # mu, unlabeled images per labeled image
    eval_every=1024,  # evaluate the EMA model (and checkpoint) every N steps
    image_size=None,  # resize once at load; None keeps the native size
    wd=5e-4,  # weight decay on conv and linear weights
    ema_warmup=None,  # None: the run decides (see EMA_INITIAL_SHARE_MAX)
    sce_alpha=0.1,  # SCE's alpha and beta for CIFAR-10 (Wang et al. 2019)
    sce_beta=1.0,
)
DATASET_DEFAULTS = {
    # Ours, for a CPU: the fastest configuration at which KD-FixMatch reaches 97 % (RESULTS.md).
    "digits": dict(
        FIXMATCH,
        labels=50,
        arch="small_cnn",
        steps=500,
        batch_size=32,
        mu=5,
        eval_every=100,
    ),
    "cifar10": FIXMATCH,
    "svhn": FIXMATCH,
    "folder": FIXMATCH,
    # FixMatch's CIFAR-100 recipe (WRN-28-8, wd 1e-3) and SCE's CIFAR-100 alpha and beta.
    "cifar100": dict(FIXMATCH, arch="wrn28_8", wd=1e-3, sce_alpha=6.0, sce_beta=0.1),
    # The paper's backbone; 128 px is ours, so that 75k images fit in memory.
    "food101": dict(FIXMATCH, arch="efficientnet_b0", image_size=128),
}


# ==== The command line: parsed and checked before torch is imported ==============================
def die(msg, status=2):
    """Bad input: one line naming the flag or file and the fix, exit status 2, no traceback."""
    say_error(msg)
    sys.exit(status)


# Under torchrun every process meets the same bad input at about the same time. Rank 0 says it,
# and when it exits torchrun stops the others (within a second); another rank waits this long
# before it says the error itself, so that one line is printed, not one per process, and a
# message is never lost because its process was stopped first.
OTHER_RANKS_WAIT_S = 10


def say_error(msg):
    """The error line on stderr: by rank 0, or by another rank that rank 0 did not stop."""
    close_progress_bars()
    rank = rank_of_this_process()
    line = f"kdfixmatch.py: error: {msg}"
    if rank != 0:
        time.sleep(OTHER_RANKS_WAIT_S)
        line = f"kdfixmatch.py: error: (rank {rank}) {msg}"
    print(line, file=sys.stderr, flush=True)


def rank_of_this_process():
    """torchrun's RANK: this process's number among the run's processes (0 without torchrun).

    A RANK without a WORLD_SIZE above 1 (another launcher's variable) is not torchrun's.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0
    return int(os.environ.get("RANK", "0"))


def close_progress_bars():
    """Close tqdm's open bars: a message is then the last line, not followed by a bar's redraw."""
    bar_class = getattr(sys.modules.get("tqdm"), "tqdm", None)
    for bar in list(getattr(bar_class, "_instances", [])):
        bar.close()


def interrupted(args):
    """Ctrl-C: one line, exit status 130; --resume is offered only for this command's run.

    Under torchrun, Ctrl-C reaches every process: rank 0 says it, the others leave quietly.
    """
    if rank_of_this_process() != 0:
        sys.exit(130)
    config = os.path.join(args.out, "config.json")
    resumable = args.resume
    if not resumable and os.path.exists(config):
        resumable = read_json(config) == vars_of(args)
    if resumable:
        hint = f"resume with: {this_command(args)} --out {shlex.quote(args.out)} --resume"
    else:
        hint = "nothing saved yet"
    close_progress_bars()
    print(f"kdfixmatch.py: interrupted; {hint}", file=sys.stderr)
    sys.exit(130)


def this_command(args):
    """How this run was started: python, or torchrun with its number of processes."""
    if args.world_size == 1:
        return f"python {sys.argv[0]}"
    if args.local_world_size == args.world_size:
        return f"torchrun --standalone --nproc_per_node {args.world_size} {sys.argv[0]}"
    nodes = args.world_size // args.local_world_size
    return (
        f"torchrun --nnodes {nodes} --nproc_per_node {args.local_world_size} --rdzv_backend c10d "
        f"--rdzv_endpoint HOST:PORT {sys.argv[0]}"
    )


# What a damaged record's error suggests, unless the caller knows better.
REDO = "replace it, or remove it and --resume to redo that stage"


def flag(name):
    """The command-line spelling of an argument name: sce_alpha -> --sce-alpha."""
    return "--" + name.replace("_", "-")


def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--method", default="kdfixmatch", choices=["supervised", "fixmatch", "kdfixmatch", "suave"]
    )
    add_data_flags(p.add_argument_group("data and model"))
    add_fixmatch_flags(p.add_argument_group("FixMatch: the outer SNN, and the inner SNN's recipe"))
    add_kd_flags(p.add_argument_group("KD-FixMatch"))
    add_suave_flags(p.add_argument_group("Suave (Fini et al. 2023; defaults from its code)"))
    add_run_flags(p.add_argument_group("the run"))
    # argparse's own errors are one line too.
    p.error = die
    return p


def add_data_flags(g):
    a = g.add_argument
    a("--dataset", default="digits", choices=list(DATASET_DEFAULTS), help="folder: see --data-dir")
    a("--data-dir", default="data", help="torchvision root, or an ImageFolder root: train/ test/")
    a("--labels", type=int, help="labeled examples, class-balanced [digits 50, else 4000]")
    a("--image-size", type=int, help="resize images once at load [native; food101 128]")
    a(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="image-folder decoding workers",
    )
    a(
        "--arch",
        choices=["small_cnn", "wrn28_2", "wrn28_8", "efficientnet_b0"],
        help="[per dataset]",
    )
    a("--pretrained", action="store_true", help="ImageNet weights for efficientnet_b0 (the paper)")
    a("--weights", help="a local efficientnet_b0 ImageNet state_dict file (offline --pretrained)")


def add_fixmatch_flags(g):
    a = g.add_argument
    a("--steps", type=int, help="K, optimizer steps per SNN [paper 2^20; digits 500]")
    a("--batch-size", type=int, help="B, labeled images per step [64; digits 32]")
    a("--mu", type=int, help="mu, unlabeled images per labeled image (FixMatch: 7; digits: 5)")
    a("--tau", type=float, default=0.95, help="tau, pseudo-label confidence threshold (outer SNN)")
    a("--lambda-u", type=float, default=1.0, help="lambda_u, weight of the unlabeled loss")
    a("--lr", type=float, default=0.03, help="eta, SGD learning rate; decays as cos(7 pi k / 16 K)")
    a("--momentum", type=float, default=0.9, help="beta, Nesterov momentum")
    a("--wd", type=float, help="weight decay on conv/linear weights [5e-4; cifar100 1e-3]")
    a("--ema", type=float, default=0.999, help="EMA decay of the weights that evaluate and label")
    a(
        "--ema-warmup",
        action=argparse.BooleanOptionalAction,
        help="decay min(ema, (1+k)/(10+k)); ours [on while ema^K > 1 %%]",
    )


def add_kd_flags(g):
    a = g.add_argument
    a("--tau-select", type=float, default=0.80, help="tau_select, outer confidence of a candidate")
    a("--tau-inner", type=float, default=0.95, help="tau_inner, inner confidence threshold")
    a("--loss", default="ce", choices=["ce", "sce"], help="inner SNN's unlabeled loss")
    a("--sce-alpha", type=float, help="SCE alpha, weight of CE [0.1; cifar100 6.0]")
    a("--sce-beta", type=float, help="SCE beta, weight of reverse CE [1.0; cifar100 0.1]")
    a("--sce-A", type=float, default=-4.0, help="SCE A = log 0 in the reverse CE")
    a("--no-dec", action="store_true", help="ablation: trusted subset = confident samples only")
    a("--dec-tol", type=float, default=0.001, help="DEC stops when < this share of points moves")
    a("--dec-max-iters", type=int, default=2000, help="DEC iteration cap (SGD steps)")
    a("--dec-lr", type=float, default=0.01, help="DEC centroid SGD learning rate (momentum 0.9)")
    a("--dec-batch", type=int, default=256, help="DEC batch size")
    a("--kmeans-init", type=int, default=20, help="k-means restarts initialising DEC")
    a("--outer-from", help="reuse the outer SNN of a finished fixmatch/kdfixmatch run in this dir")


def add_suave_flags(g):
    a = g.add_argument
    a("--suave-temperature", type=float, default=0.1, help="temperature of the cosine scores")
    a("--sinkhorn-eps", type=float, default=0.05, help="Sinkhorn-Knopp epsilon")
    a("--sinkhorn-iters", type=int, default=3, help="Sinkhorn-Knopp iterations")
    a("--label-smoothing", type=float, default=0.01, help="on the labeled term")
    a("--suave-hidden", type=int, default=2048, help="projector hidden units")
    a("--suave-dim", type=int, default=128, help="projector output (prototype) dimension")


def add_run_flags(g):
    a = g.add_argument
    a("--seed", type=int, default=0, help="draws the labeled split, init and augmentation")
    a("--eval-every", type=int, help="evaluate the EMA model (and checkpoint) every N steps")
    a("--out", default="runs/latest", help="output dir: metrics.jsonl, results.json, checkpoints")
    a("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    a("--device", default="auto", help="auto, cpu, cuda, cuda:N (data: in GPU memory if it fits)")
    a("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 on CUDA")
    a("--compile", action="store_true", help="torch.compile the model; on a GPU with CUDA graphs")
    a("--bench", action="store_true", help="print images/s of augment, step and loop; train none")
    a("--tensorboard", action="store_true", help="also write curves for TensorBoard into --out")
    a(
        "--per-gpu-bn",
        action="store_true",
        help="torchrun on GPUs: BatchNorm per GPU, not SyncBatchNorm over the global batch",
    )


# Every numeric flag and its valid range, checked before anything runs: (flags, test, the range).
VALID = [
    (
        "labels steps batch_size mu eval_every dec_max_iters dec_batch kmeans_init sinkhorn_iters "
        "suave_hidden suave_dim",
        lambda v: v >= 1,
        "a positive integer",
    ),
    ("lr dec_lr suave_temperature sinkhorn_eps", lambda v: v > 0, "> 0"),
    ("wd lambda_u sce_alpha sce_beta workers", lambda v: v >= 0, ">= 0"),
    ("tau tau_select tau_inner dec_tol", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("ema momentum label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("sce_A", lambda v: v < 0, "< 0 (A is log 0)"),
    ("image_size", lambda v: v >= 8, ">= 8 (pixels)"),
    ("seed", lambda v: 0 <= v < 2**31, "in [0, 2^31)"),
]
# The EMA warm-up's default. FixMatch's constant decay 0.999 suits its 2^20 steps; a run of a few
# hundred steps would evaluate (and label with) a model that is still mostly its random
# initialisation: 0.999^300 = 74 %. Unless --ema-warmup or --no-ema-warmup is given, the warm-up
# is on exactly when a constant EMA would still hold more than this share of the initial weights
# at step K (at 0.999: K < 4,603), so the paper's recipe is unchanged.
EMA_INITIAL_SHARE_MAX = 0.01


def constant_ema_initial_share(args):
    """The share of the initial weights a constant EMA still holds after K steps: ema^K."""
    return args.ema**args.steps


# --outer-from reuses another run's outer SNN, so these flags come from that run's config.json.
OUTER_RECIPE = (
    "dataset data_dir labels image_size arch pretrained weights steps batch_size mu tau "
    "lambda_u lr momentum wd ema ema_warmup seed"
).split()
# Flags that --resume may change: where the run's code, data or hardware live, not its recipe.
FREE_ON_RESUME = set(
    "out resume workers device precision compile data_dir bench tensorboard".split()
)
# Flags newer than some runs' config.json: a missing one is the flag's default (off).
ADDED_LATER = {"tensorboard", "per_gpu_bn"}
# After a NaN stop (diverged.json), --resume may also change the optimisation's knobs.
FREE_AFTER_NAN_STOP = set("lr wd momentum lambda_u ema ema_warmup sinkhorn_eps sce_beta".split())


def get_args(argv=None):
    """Parse and check the flags; fill the rest from the run being resumed, then the dataset."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = flags_given(parser, argv, args)
    if not args.out.strip() or os.path.isfile(args.out):
        die(f"--out {args.out!r} is not a directory; choose another --out")
    read_world(args)
    take_recorded_recipe(args, given, parser)
    for name, value in DATASET_DEFAULTS[args.dataset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    check_values(args)
    if args.ema_warmup is None:
        args.ema_warmup = constant_ema_initial_share(args) > EMA_INITIAL_SHARE_MAX
    refuse_flags_that_do_nothing(args, given)
    check_paths(args)
    return args


def read_world(args):
    """torchrun's environment: how many processes, this one's rank; without torchrun, one.

    LOCAL_RANK numbers the processes on this machine (its GPU), LOCAL_WORLD_SIZE counts them.
    """
    args.world_size = int(os.environ.get("WORLD_SIZE", "1"))
    args.rank = rank_of_this_process()
    if args.world_size == 1:
        # Another launcher's LOCAL_RANK or LOCAL_WORLD_SIZE is not torchrun's.
        args.local_rank = 0
        args.local_world_size = 1
    else:
        args.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        args.local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(args.world_size)))


def flags_given(parser, argv, args):
    """The flags on the command line: those that a parse over an all-None namespace sets."""
    blank = argparse.Namespace(**dict.fromkeys(vars(args)))
    parsed = parser.parse_args(argv, blank)
    return {name for name, value in vars(parsed).items() if value is not None}


def read_json(path, fix=REDO):
    """A JSON record; unreadable or corrupt: one line naming the file and the fix."""
    try:
        with open(path) as f:
            return json.load(f)
    except Exception as e:
        reason = getattr(e, "strerror", None) or type(e).__name__
        die(f"cannot load {path} ({reason}); {fix}")


def vars_of(args):
    """The flags of a run, as config.json records them."""
    runtime = ("dev", "mean", "std", "bf16", "t0", "lock")
    runtime += ("rank", "local_rank", "local_world_size")
    return {k: v for k, v in vars(args).items() if k not in runtime}


def take_recorded_recipe(args, given, parser):
    """--resume: the run's config.json; --outer-from: the outer run's recipe; given flags agree."""
    source = recipe_source(args)
    if source is None or not os.path.exists(source):
        return
    recorded = read_json(source, "restore it")
    if not isinstance(recorded, dict):
        die(f"{source}: not a JSON object; restore it")
    complete = args.resume and os.path.exists(os.path.join(args.out, "results.json"))
    if args.resume and not complete:
        # A config.json older than torchrun support records none: one process.
        refuse_other_world_size(args, recorded.get("world_size", 1), source)
    flags = {a.dest: a for a in parser._actions if a.dest != "help"}
    if args.resume:
        required = flags.keys() - FREE_ON_RESUME - ADDED_LATER
    else:
        required = set(OUTER_RECIPE)
    # Only the flags' fields are taken (and, for --outer-from, only the outer's recipe).
    recorded = {k: v for k, v in recorded.items() if k in flags and (args.resume or k in required)}
    check_recorded_recipe(source, recorded, flags, required)
    refuse_other_recipe(args, given, recorded, source)
    for name, value in recorded.items():
        if name not in given | {"out", "resume"}:
            setattr(args, name, value)
    if complete:
        # Under torchrun every process finds it: rank 0 says so.
        if args.rank == 0:
            print(f"kdfixmatch.py: {args.out} is complete (results.json); nothing to resume")
        sys.exit(0)


def refuse_other_world_size(args, trained_on, source):
    """--resume on as many processes as the run had.

    With per-process BatchNorm its statistics, and with any BatchNorm the per-process batch,
    belong to that number.
    """
    if trained_on == args.world_size:
        return
    if trained_on == 1:
        how = f"python {sys.argv[0]} --out {shlex.quote(args.out)} --resume, without torchrun"
    else:
        how = f"torchrun with {trained_on} processes in all (--nproc_per_node x --nnodes)"
    die(
        f"--resume: {args.out} was trained by {trained_on} process(es) ({source} world_size), "
        f"this command starts {args.world_size}; resume it with {how}"
    )


def check_recorded_recipe(path, recorded, flags, required):
    """A config.json's fields as this program writes them: one line naming a missing or bad one.

    A hand edit or damage must not train another recipe: a missing `steps` used to train the
    dataset's default number of steps.
    """
    for name in sorted(required - recorded.keys()):
        die(f"{path} has no field {name}; restore it")
    # The dataset first: it decides which fields may be null.
    for name in sorted(recorded, key=lambda name: name != "dataset"):
        problem = field_problem(name, flags[name], recorded[name], recorded.get("dataset"))
        if problem:
            die(f"{path} field {name}: {json.dumps(recorded[name])} {problem}; restore it")


# The JSON types that a flag's value may have in config.json, by the flag's argparse type.
JSON_KINDS = {
    int: ((int,), "an integer"),
    float: ((int, float), "a number"),
    None: ((str,), "a string"),
}


def field_problem(name, action, value, dataset):
    """Why a recorded value is not one that the flag `action` could have given, or None."""
    if action.nargs == 0:
        # --pretrained, --ema-warmup and the like: true or false.
        return None if type(value) is bool else "is not true or false"
    if value is None:
        may_be_null = action.default is None and DATASET_DEFAULTS[dataset].get(name) is None
        return None if may_be_null else "is null"
    kinds, kind_name = JSON_KINDS[action.type]
    if type(value) not in kinds:
        return f"is not {kind_name}"
    if action.choices and value not in action.choices:
        return f"is not one of {', '.join(action.choices)}"
    for names, is_valid, valid_range in VALID:
        if name in names.split() and not (math.isfinite(value) and is_valid(value)):
            return f"must be {valid_range}"
    return None


def recipe_source(args):
    """The config.json that holds this command's recipe: the resumed run's, or the outer's."""
    config = os.path.join(args.out, "config.json")
    if args.resume and not os.path.exists(config):
        die(f"--resume: nothing to resume in --out {args.out}; drop --resume to start a new run")
    if args.resume:
        return config
    if args.method == "kdfixmatch" and args.outer_from and not args.bench:
        return os.path.join(args.outer_from, "config.json")
    return None


def refuse_other_recipe(args, given, recorded, source):
    """A flag given on the command line must agree with the recorded recipe."""
    free = set(FREE_ON_RESUME)
    if args.resume and os.path.exists(os.path.join(args.out, "diverged.json")):
        free |= FREE_AFTER_NAN_STOP
    if args.resume:
        opt = "--resume"
        how = "resume with the original flags (or none) or start a new --out"
    else:
        opt = "--outer-from"
        how = "drop it, or train a new outer SNN"
    for name in sorted(given & recorded.keys() - free):
        if recorded[name] != getattr(args, name):
            die(
                f"{opt}: {flag(name)} {getattr(args, name)} differs from {recorded[name]} "
                f"in {source}; {how}"
            )


def check_values(args):
    for names, is_valid, valid_range in VALID:
        for name in names.split():
            value = getattr(args, name)
            if value is None:
                continue
            if not (math.isfinite(value) and is_valid(value)):
                die(f"{flag(name)} {value}: must be {valid_range}")
    # B and mu*B are the global batch: each of torchrun's N processes takes an equal share (an N
    # that divides B divides mu*B too), so that the mean of the processes' losses, and DDP's mean
    # of their gradients, are the one-process batch's.
    N = args.world_size
    if args.batch_size % N:
        multiple = N * max(1, round(args.batch_size / N))
        die(
            f"--batch-size {args.batch_size}: the global batch does not split evenly over "
            f"torchrun's {N} processes; use a multiple of {N} (e.g. {multiple})"
        )


def flags_that_do_nothing(args):
    """(flags, why they do nothing) for this command; a flag with no reason (None) is used."""
    method = args.method
    if args.bench:
        by = "--bench"
    else:
        by = f"--method {method}"
    kd = method == "kdfixmatch" and not args.bench
    dec_unused = None
    if not kd:
        dec_unused = by
    elif args.no_dec:
        dec_unused = "--no-dec"
    sce_unused = None
    if not kd:
        sce_unused = by
    elif args.loss == "ce":
        sce_unused = "--loss ce"
    return [
        ("mu", by if method == "supervised" else None),
        ("lambda_u tau", by if method in ("supervised", "suave") else None),
        ("tau", "--outer-from" if args.outer_from else None),
        ("tau_select tau_inner loss no_dec outer_from", None if kd else by),
        ("dec_tol dec_max_iters dec_lr dec_batch kmeans_init", dec_unused),
        ("sce_alpha sce_beta sce_A", sce_unused),
        (
            "suave_temperature sinkhorn_eps sinkhorn_iters label_smoothing suave_hidden suave_dim",
            by if method != "suave" else None,
        ),
        ("pretrained weights", f"--arch {args.arch}" if args.arch != "efficientnet_b0" else None),
        ("per_gpu_bn", per_gpu_bn_does_nothing(args)),
        (
            "method steps resume out seed eval_every",
            "--bench (it times FixMatch)" if args.bench else None,
        ),
    ]


def per_gpu_bn_does_nothing(args):
    """Why --per-gpu-bn would do nothing, or None."""
    if args.world_size == 1:
        return "one process (without torchrun)"
    if args.device == "cpu":
        return "--device cpu (BatchNorm is per process there already)"
    return None


def refuse_flags_that_do_nothing(args, given):
    for names, why in flags_that_do_nothing(args):
        if why is None:
            continue
        for name in set(names.split()) & given:
            die(f"{flag(name)} does nothing with {why}; drop it")


def check_paths(args):
    if args.outer_from and not os.path.exists(os.path.join(args.outer_from, "outer.pt")):
        die(f"--outer-from {args.outer_from}: no finished outer SNN (outer.pt) there")
    missing = [s for s in ("train", "test") if not os.path.isdir(os.path.join(args.data_dir, s))]
    if args.dataset == "folder" and missing:
        die(
            "--dataset folder needs --data-dir DIR with DIR/train/<class>/ and DIR/test/<class>/ "
            f"(no {os.path.join(args.data_dir, missing[0])})"
        )
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device):
        die(f"--device {args.device}: unknown; use auto, cpu, cuda or cuda:N")
    if args.world_size > 1 and ":" in args.device:
        die(
            f"--device {args.device}: under torchrun each process takes the GPU of its "
            "LOCAL_RANK; use --device cuda (or auto), and CUDA_VISIBLE_DEVICES to choose GPUs"
        )
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        die("--tensorboard needs the tensorboard package: pip install tensorboard")


# Flags first: a typo costs no torch import. Loading torch takes seconds: a Ctrl-C then is one
# line too.
if __name__ == "__main__":
    ARGS = get_args()
try:
    import numpy as np
    import PIL.Image
    import sklearn.datasets
    import torch
    import torch.distributed as dist
    import torch.nn as nn
    import torch.nn.functional as F
    import torchvision
    import torchvision.transforms.v2.functional as TF
    from scipy.optimize import linear_sum_assignment
    from sklearn.cluster import KMeans
    from tqdm import tqdm

    import kernels
except KeyboardInterrupt:
    if __name__ != "__main__":
        raise
    interrupted(ARGS)


# ==== Data: every set decoded once into a uint8 tensor (N, C, H, W) in memory ====================
def load_dataset(args):
    """-> dict(train_x, train_y, test_x, test_y, classes, flip): uint8 images (N, C, H, W)."""
    if args.dataset == "digits":
        # 1,797 images of 8x8 pixels, 10 classes (load_digits).
        side = args.image_size or 8
        refuse_what_does_not_fit(args, 1797, (1, side, side), 10)
        return load_digits(args.image_size)
    if args.dataset == "folder":
        splits = image_folders(args.data_dir)
    else:
        splits = [torchvision_split(args.dataset, args.data_dir, train) for train in (True, False)]
    shape = decoded_shape(splits[0], args.image_size)
    if shape is not None:
        images = sum(len(ds) for ds in splits)
        refuse_what_does_not_fit(args, images, shape, len(getattr(splits[0], "classes", [])) or 10)
    # Each split as a list of (x, y) parts, or of error strings from the decoding workers.
    parts = [to_uint8(ds, args.image_size, args.workers) for ds in splits]
    refuse_bad_parts(parts, args.data_dir)
    (train_x, train_y), (test_x, test_y) = [[torch.cat(t) for t in zip(*ps)] for ps in parts]
    classes = len(getattr(splits[0], "classes", []))
    if not classes:
        classes = int(train_y.max()) + 1
    # FixMatch flips every dataset but SVHN, whose digits a flip would change.
    flip = args.dataset != "svhn"
    return dict(
        train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, classes=classes, flip=flip
    )


def fetch_dataset(args):
    """Under torchrun: rank 0 downloads torchvision's set, if missing, before any process loads it.

    torchvision writes a download into the file it then reads (no temporary name), so several
    processes downloading at once would corrupt it.
    """
    if args.world_size == 1 or args.dataset in ("digits", "folder"):
        return
    on_rank_0(args, download_dataset, args)


def download_dataset(args):
    for train in (True, False):
        torchvision_split(args.dataset, args.data_dir, train)


def refuse_bad_parts(parts, root):
    """A file that did not decode, or images of several sizes (train/ against test/ too)."""
    decoded = [p for split_parts in parts for p in split_parts]
    errors = [p for p in decoded if isinstance(p, str)]
    if errors:
        die(f"--data-dir {root}: {errors[0]}")
    sizes = sorted({tuple(p[0].shape[2:]) for p in decoded})
    if len(sizes) > 1:
        die(f"--data-dir {root}: images differ in size {sizes}; pass --image-size N")


def load_digits(size):
    """scikit-learn's 1,797 real 8x8 digits, offline; a fixed seeded split of 1,500 / 297."""
    d = sklearn.datasets.load_digits()
    x = torch.tensor(d.images * (255 / 16)).round().to(torch.uint8)[:, None]
    if size:
        x = TF.resize(x, [size] * 2, antialias=True)
    y = torch.tensor(d.target)
    order = torch.randperm(1797, generator=torch.Generator().manual_seed(12345))
    test, train = order.split([297, 1500])
    return dict(
        train_x=x[train], train_y=y[train], test_x=x[test], test_y=y[test], classes=10, flip=False
    )


def image_folders(root):
    """torchvision ImageFolders root/train and root/test, with the same classes (at least 2)."""
    for split in ("train", "test"):
        refuse_unsafe_files(root, f"{root}/{split}")
    try:
        splits = [torchvision.datasets.ImageFolder(f"{root}/{s}") for s in ("train", "test")]
    except FileNotFoundError as e:
        # No class folder, or a class folder without images.
        die(f"--data-dir {root}: {e}")
    train_classes, test_classes = [ds.classes for ds in splits]
    if train_classes != test_classes or len(train_classes) < 2:
        only_one = sorted(set(train_classes) ^ set(test_classes))
        die(
            f"--data-dir {root}: train/ and test/ need the same class folders, at least 2 (they"
            f" hold {len(train_classes)} and {len(test_classes)}; in one only: {only_one})"
        )
    return splits


def refuse_unsafe_files(root, top):
    """No symbolic link loop, and no image file that is not a regular file: each one named.

    Checked before ImageFolder walks the tree: a directory link back up (train/a/x -> ..)
    multiplied the set and mislabelled a class, and a named pipe called x.png blocked decoding.
    """
    seen = set()
    for dirpath, _, filenames in os.walk(top, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            die(
                f"--data-dir {root}: {dirpath} leads back to {real}, which the folder already "
                "holds (a symbolic link loop, or a second link to it); remove that link"
            )
        seen.add(real)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if torchvision.datasets.folder.has_file_allowed_extension(
                name, torchvision.datasets.folder.IMG_EXTENSIONS
            ):
                refuse_unsafe_file(root, path)


def refuse_unsafe_file(root, path):
    """An image file that a symbolic link loop, a named pipe, a socket or a device is not."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            die(f"--data-dir {root}: {path} is a symbolic link loop; remove it")
        die(f"--data-dir {root}: cannot read {path} ({e.strerror}); replace or remove it")
    if not stat.S_ISREG(mode):
        kind = "a named pipe" if stat.S_ISFIFO(mode) else "a socket or device"
        die(f"--data-dir {root}: {path} is not a regular file ({kind}); remove it")


def torchvision_split(name, root, train):
    """A torchvision dataset from root; not on disk: a download, if this machine is online."""
    cls = getattr(torchvision.datasets, {"food101": "Food101"}.get(name, name.upper()))
    if name.startswith("cifar"):
        split = dict(train=train)
    else:
        split = dict(split="train" if train else "test")
    for download in (False, True):
        try:
            return cls(root, download=download, **split)
        except Exception as e:
            error = type(e).__name__
            socket.setdefaulttimeout(30)
    die(
        f"--dataset {name}: not found in {os.path.abspath(root)} and the download failed "
        f"({error}); "
        f"fetch it on a connected machine with torchvision.datasets.{cls.__name__}('{root}', "
        f"download=True) and copy {root}/ here, or pass --data-dir"
    )


def to_uint8(ds, size, workers):
    """Array-backed sets (CIFAR, SVHN) as they are; image files decoded in DataLoader workers."""
    if isinstance(getattr(ds, "data", None), np.ndarray):
        x = torch.from_numpy(ds.data)
        # SVHN is stored NCHW, CIFAR NHWC.
        if x.shape[1] not in (1, 3):
            x = x.permute(0, 3, 1, 2)
        if size:
            x = torch.cat([TF.resize(c, [size] * 2, antialias=True) for c in x.split(4096)])
        y = torch.tensor(getattr(ds, "targets", None) or ds.labels)
        return [(x.contiguous(), y)]
    # The workers send a tensor per batch, not per image: one file descriptor each.
    ds.loader = functools.partial(decode, size=size)
    loader = torch.utils.data.DataLoader(ds, 256, num_workers=workers, collate_fn=stack_decoded)
    try:
        return list(tqdm(loader, desc="decode", leave=False, disable=None))
    except RuntimeError as e:
        # A worker killed (a signal to it, or the out-of-memory killer): the DataLoader's two
        # chained tracebacks become one line.
        if "DataLoader worker" not in str(e):
            raise
        # The cause, when it is the signal's own message, names the signal too.
        reason = str(e)
        if "DataLoader worker" in str(e.__cause__):
            reason = str(e.__cause__)
        close_progress_bars()
        print(
            f"kdfixmatch.py: error: decoding stopped: {reason}; run again, with fewer --workers "
            "(or --workers 0) if memory is short",
            file=sys.stderr,
            flush=True,
        )
        # The surviving workers can keep the interpreter's exit waiting on the DataLoader's
        # queues for ever (seen in tests): leave at once. Nothing of the run is written yet.
        os._exit(1)


def decode(path, size=None):
    """Image file -> uint8 RGB (3, H, W), or a string saying why not; 16-bit and float scaled."""
    try:
        with PIL.Image.open(path) as im:
            # More than 8 bits per pixel: scale to 8 bits, do not clip.
            if im.mode == "F" or im.mode.startswith("I"):
                a = np.asarray(im, np.float64)
                top = 1 if im.mode == "F" else 65535
                # A NaN fails this test too.
                if not 0 <= a.min() <= a.max() <= top:
                    return f"{path}: {im.mode} pixels outside [0, {top}]; convert it to 8 bits"
                im = PIL.Image.fromarray(np.rint(a * (255 / top)).astype(np.uint8))
            if im.mode == "La":
                im = im.convert("LA")
            im = im.convert("RGB")
            if size:
                im = TF.center_crop(TF.resize(im, size), size)
            return TF.pil_to_tensor(im)
    except Exception as e:
        # Corrupt, truncated, empty, or not an image.
        return f"cannot decode {path} ({type(e).__name__}: {e}); replace or remove it"


def stack_decoded(batch):
    """One tensor per batch of decoded images; a decoding error (a string) goes on as it is."""
    images = [im for im, _ in batch]
    errors = [im for im in images if isinstance(im, str)]
    if errors:
        return errors[0]
    if len({im.shape for im in images}) > 1:
        return "images differ in size; pass --image-size N"
    return torch.stack(images), torch.tensor([label for _, label in batch])


def labeled_split(train_y, n_labels, classes, seed):
    """Class-balanced labeled indices drawn by seed (the unlabeled set is all training images)."""
    per_class, rest = divmod(n_labels, classes)
    smallest = int(torch.bincount(train_y, minlength=classes).min())
    if rest:
        die(
            f"--labels {n_labels} is not divisible by the {classes} classes; use a multiple of "
            f"{classes}"
        )
    if per_class > smallest:
        die(
            f"--labels {n_labels} asks for {per_class} per class but the smallest class has "
            f"{smallest}; use at most {smallest * classes}"
        )
    g = torch.Generator().manual_seed(seed)
    by_class = [torch.nonzero(train_y == c).squeeze(1) for c in range(classes)]
    chosen = [i[torch.randperm(len(i), generator=g)[:per_class]] for i in by_class]
    return torch.cat(chosen).sort()[0]


# ==== Memory: what the data and a training step need, estimated before either is allocated ======
# An --image-size or --mu too large for the machine used to end in an allocator's traceback,
# minutes of swapping, or an out-of-memory kill with no message. The estimates are lower bounds
# (every layer's output counted once), so a run that fits is never refused.
def decoded_shape(ds, size):
    """(C, H, W) of a split's images once decoded, without decoding them; None if unknown."""
    if isinstance(getattr(ds, "data", None), np.ndarray):
        # CIFAR is stored NHWC, SVHN NCHW.
        _, first, second, third = ds.data.shape
        if first in (1, 3):
            channels, height, width = first, second, third
        else:
            channels, height, width = third, first, second
        if size:
            height = width = size
        return channels, height, width
    # Image files decode to RGB: --image-size square, or (ImageFolder) the first image's size.
    if size:
        return 3, size, size
    if not getattr(ds, "samples", None):
        return None
    try:
        with PIL.Image.open(ds.samples[0][0]) as im:
            width, height = im.size
    except Exception:
        # Not an image: decoding reports it, by name.
        return None
    return 3, height, width


def refuse_what_does_not_fit(args, images, shape, classes):
    """One line with the figure and the limit when the images, or a step, cannot fit in memory."""
    host = memory_available(torch.device("cpu"))
    if host is None:
        return
    # The images as uint8; twice while the decoded parts are joined into one tensor; under
    # torchrun, in each of this machine's processes.
    copies = getattr(args, "local_world_size", 1)
    data = 2 * images * math.prod(shape) * copies
    if data > host:
        by = f" in each of {copies} processes" if copies > 1 else ""
        die(
            f"{size_flag(args, shape)}: the {images} images need about {gib(data)} GiB of "
            f"memory{by}, more than the {gib(host)} GiB available; use a smaller --image-size"
        )
    if args.arch == "efficientnet_b0" and shape[0] != 3:
        # build_model refuses these images later, in its own words.
        return
    # load_dataset may run without setup_device (a test, a notebook): then the CPU, in fp32.
    device = getattr(args, "dev", torch.device("cpu"))
    if device.type == "cuda":
        refuse_a_step_that_does_not_fit(args, images, shape, classes, memory_available(device))
    else:
        refuse_a_step_that_does_not_fit(args, images, shape, classes, host - data)


def refuse_a_step_that_does_not_fit(args, images, shape, classes, room):
    """A training step's activations, or an evaluation's, against `room` bytes of memory."""
    per_image, largest = activation_sizes(args, shape, classes)
    element = 2 if getattr(args, "bf16", False) else 4
    supervised = args.method == "supervised" and not args.bench
    step_images = args.batch_size if supervised else args.batch_size * (1 + 2 * args.mu)
    # Under torchrun each process holds its share of the step.
    step_images //= getattr(args, "world_size", 1)
    step = step_images * per_image * element
    # An evaluation holds a layer's input and output for 1024 images at a time.
    evaluation = min(1024, images) * 2 * largest * element
    where = "GPU" if getattr(args, "dev", torch.device("cpu")).type == "cuda" else "host"
    flags = f"--batch-size {args.batch_size}" + ("" if supervised else f", --mu {args.mu}")
    if args.image_size:
        flags += f", --image-size {args.image_size}"
    if step > room:
        die(
            f"{flags}: a training step needs about {gib(step)} GiB ({step_images} images of "
            f"{'x'.join(map(str, shape))} through {args.arch}), more than the {gib(room)} GiB of "
            f"{where} memory available; lower them"
        )
    if evaluation > room:
        die(
            f"{size_flag(args, shape)}: evaluating 1024 images at a time needs about "
            f"{gib(evaluation)} GiB ({args.arch}), more than the {gib(room)} GiB of {where} "
            "memory available; use a smaller --image-size"
        )


def size_flag(args, shape):
    """--image-size N, or the images' own C x H x W."""
    if args.image_size:
        return f"--image-size {args.image_size}"
    return "x".join(map(str, shape)) + " images"


def activation_sizes(args, shape, classes):
    """Per image: the elements of every layer's output (summed), and of the largest one.

    Counted by a forward pass on the meta device, which computes shapes and allocates nothing.
    The network as build_model makes it: Suave's projector head (a few thousand values per
    image) is left out, as the lower bound allows.
    """
    with torch.device("meta"):
        model = build_model(args.arch, shape[0], classes)
    sizes = []

    def count(module, inputs, output):
        sizes.append(output[0].numel())

    for module in model.modules():
        if not list(module.children()):
            module.register_forward_hook(count)
    # Two images: BatchNorm in training mode needs more than one value per channel.
    model(torch.empty(2, *shape, device="meta"))
    return sum(sizes), max(sizes)


def memory_available(device):
    """Bytes free on a GPU; on the host, MemAvailable (less under a cgroup limit); None: unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def gib(n):
    return f"{n / 2**30:.1f}"


# ==== Augmentation (FixMatch): weak and strong views, drawn per sample, applied per batch ========
# The weak view flips and shifts; the strong view adds RandAugment (two ops drawn from RA_OPS, each
# applied with probability 0.5, magnitude 1..9 of 10) and Cutout, as FixMatch's official code
# does. A batch's random draws (its "plan") come first; then each op runs once per op slot on the
# samples that drew it, so a batch costs a few hundred tensor operations, not one per image. On a
# GPU, kernels.augment applies a whole plan in one launch with the same pixels.
RA_OPS = (
    "identity",
    "autocontrast",
    "equalize",
    "brightness",
    "color",
    "contrast",
    "sharpness",
    "posterize",
    "solarize",
    "rotate",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
)
# RA_OPS[GEOMETRIC:] resample the image: one affine transformation per slot serves all of them.
GEOMETRIC = 9


def augment(x, flip=True, strong=False, generator=None):
    """uint8 (N, C, H, W) on any device -> weak (flip, shift) or strong (+ RandAugment, Cutout)."""
    plan = draw_plan(len(x), *x.shape[-2:], flip, strong, generator)
    return apply_plan(x, plan)


def draw_plan(N, H, W, flip=True, strong=False, generator=None):
    """Every random choice of N views, per sample; the order of the draws is part of the recipe."""
    g = dict(generator=generator)
    # The shift: up to 12.5 % of the side, as FixMatch's weak augmentation.
    pad_h = round(0.125 * H)
    pad_w = round(0.125 * W)
    plan = dict(
        flip=(torch.rand(N, **g) < 0.5) & flip,
        dy=torch.randint(-pad_h, pad_h + 1, (N,), **g),
        dx=torch.randint(-pad_w, pad_w + 1, (N,), **g),
    )
    if strong:
        # Two ops drawn with replacement; an op that loses its coin flip becomes identity (op 0).
        op = torch.randint(len(RA_OPS), (N, 2), **g)
        op = op * (torch.rand(N, 2, **g) < 0.5)
        plan.update(
            op=op,
            level=torch.randint(1, 10, (N, 2), **g),
            # The direction of the geometric ops.
            sign=torch.randint(2, (N, 2), **g) * 2 - 1,
            # Cutout's centre.
            cy=torch.randint(H, (N,), **g),
            cx=torch.randint(W, (N,), **g),
        )
    return plan


def slot_params(op, level, sign, H, W):
    """One op slot's per-sample parameters, in float64 as torchvision computes them.

    pt: the point ops' (f, 1 - f, posterize bit mask, solarize threshold); theta: the inverse
    affine matrix that TF.affine would build for the geometric op (zero angle and shift for the
    other ops).
    """
    m = level.double() / 10
    signed_m = m * sign
    # The official code's enhance ops (brightness, color, contrast, sharpness) span 0.1 .. 1.9.
    f = 0.1 + 1.8 * m
    zero = torch.zeros_like(m)

    def where_op(name, value):
        return torch.where(op == RA_OPS.index(name), value, zero)

    # Up to 30 degrees (with TF.rotate's sign), shear up to 0.3, shift up to 30 % of the side.
    rot = torch.deg2rad(where_op("rotate", -30 * signed_m))
    shear_x = where_op("shear_x", torch.atan(0.3 * signed_m))
    shear_y = where_op("shear_y", torch.atan(0.3 * signed_m))
    tx = where_op("translate_x", torch.round(0.3 * signed_m * W))
    ty = where_op("translate_y", torch.round(0.3 * signed_m * H))
    # The official code shears with PIL's transform (1, level, 0, 0, 1, 0), which pivots on the
    # top-left corner; TF.affine pivots on the centre. Shifting the pivot by (ox, oy), half the
    # image, makes the two agree pixel for pixel.
    ox = where_op("shear_x", W / 2) + where_op("shear_y", W / 2)
    oy = where_op("shear_x", H / 2) + where_op("shear_y", H / 2)
    a = torch.cos(rot - shear_y) / torch.cos(shear_y)
    c = torch.sin(rot - shear_y) / torch.cos(shear_y)
    b = -(a * torch.tan(shear_x) + torch.sin(rot))
    d = torch.cos(rot) - c * torch.tan(shear_x)
    # Posterize keeps 8 .. 4 bits, the paper's table.
    bits = 8 - (4 * level + 5) // 10
    posterize_mask = (255 << (8 - bits)) & 255
    solarize_threshold = torch.ceil(256 * (1 - m))
    pt = torch.stack([f, 1 - f, posterize_mask, solarize_threshold], 1)
    theta = torch.stack(
        [
            d,
            -b,
            d * (ox - tx) - b * (oy - ty) - ox,
            -c,
            a,
            a * (oy - ty) - c * (ox - tx) - oy,
        ],
        1,
    )
    return dict(pt=pt, theta=theta)


def plan_columns(plan, H, W, sort_order):
    """The plan as named per-sample columns, in the layout kernels.augment reads."""
    columns = {k: plan[k] for k in ("flip", "dy", "dx", "cy", "cx") if k in plan}
    if "op" not in plan:
        return columns
    for j in range(2):
        ops = plan["op"][:, j]
        params = slot_params(ops, plan["level"][:, j], plan["sign"][:, j], H, W)
        columns[f"op{j}"] = ops
        columns[f"pt{j}"] = params["pt"]
        columns[f"theta{j}"] = params["theta"]
        if sort_order:
            # The per-op path sorts the samples by op, so that each op runs on one slice.
            order = torch.argsort(ops, stable=True)
            columns[f"order{j}"] = order
            columns[f"back{j}"] = torch.argsort(order)
    return columns


def apply_plan(x, plan):
    """Apply drawn (or given) per-sample parameters to the uint8 batch x, on x's device."""
    N, C, H, W = x.shape
    fused = kernels.augment_takes(x)
    strong = "op" in plan
    columns = plan_columns(plan, H, W, sort_order=not fused)
    # All parameters travel in one host-to-device copy, as float32 (the integers stay exact).
    host = torch.cat([v.double().view(N, -1) for v in columns.values()], 1).float()
    flat = to_device(host, x.device)
    if fused:
        return kernels.augment(x, flat, strong)
    widths = [v.view(N, -1).shape[1] for v in columns.values()]
    p = dict(zip(columns, flat.split(widths, 1)))
    out = flip_translate(x, p["flip"][:, 0] > 0, p["dy"][:, 0].long(), p["dx"][:, 0].long())
    if strong:
        for j in range(2):
            out = apply_slot(out, plan["op"][:, j], p, j)
        out = cutout(out, p["cy"].long(), p["cx"].long())
    return out


def apply_slot(x, ops, p, j):
    """Op slot j: samples sorted by op, each op once on its slice, then back in batch order."""
    N = len(x)
    counts = torch.bincount(ops, minlength=len(RA_OPS))
    bounds = [0] + counts.cumsum(0).tolist()
    # index_select, not x[order]: 20x faster on a CPU.
    order = p[f"order{j}"][:, 0].long()
    out = x.index_select(0, order)
    pt = p[f"pt{j}"].index_select(0, order)
    theta = p[f"theta{j}"].index_select(0, order)
    for k in range(1, GEOMETRIC):
        start, end = bounds[k], bounds[k + 1]
        if end > start:
            f, g, mask, threshold = pt.T[:, start:end, None, None, None]
            out[start:end] = point_op(RA_OPS[k], out[start:end], f, g, mask, threshold)
    first_geometric = bounds[GEOMETRIC]
    if N > first_geometric:
        out[first_geometric:] = affine(out[first_geometric:], theta[first_geometric:])
    return out.index_select(0, p[f"back{j}"][:, 0].long())


def cutout(x, cy, cx):
    """Cutout as the official code: a gray square of half the side, clipped at the edges."""
    N, C, H, W = x.shape
    iy = torch.arange(H, device=x.device) - cy + H // 4
    ix = torch.arange(W, device=x.device) - cx + W // 4
    rows = ((iy >= 0) & (iy < H // 2))[:, None, :, None]
    cols = ((ix >= 0) & (ix < W // 2))[:, None, None]
    box = rows & cols
    # A multiply-add, not masked_fill: 9x faster on a CPU.
    return x * ~box + box * torch.tensor(127, dtype=torch.uint8)


def reflect(i, n):
    """Index i mirrored into [0, n), as reflect padding does."""
    return torch.where(i >= n, 2 * (n - 1) - i, i.abs())


def flip_translate(x, flip, dy, dx):
    """Weak view: flip, then shift (dy, dx) with reflect padding, one gather (TF.pad + TF.crop)."""
    N, C, H, W = x.shape
    ys = reflect(torch.arange(H, device=x.device) + dy[:, None], H)
    xs = reflect(torch.arange(W, device=x.device) + dx[:, None], W)
    xs = torch.where(flip[:, None], W - 1 - xs, xs)
    idx = torch.add(xs[:, None, :], ys[:, :, None], alpha=W)
    gathered = x.reshape(N, C, H * W).gather(2, idx.view(N, 1, H * W).expand(-1, C, -1))
    return gathered.view(N, C, H, W)


def add_rounded_once(a, b, c):
    """a + b * c rounded once to float32, as torchvision's a.add_(b, alpha=c) computes it."""
    return (a.double() + b.double() * c.double()).float()


def point_op(name, x, f, g, mask, thr):
    """One pixel-value RandAugment op, per-sample parameters (n, 1, 1, 1); equals torchvision's op.

    f and g = 1 - f blend the image with a degenerate one (black, gray, mean gray, smoothed).
    """
    if name == "equalize":
        return TF.equalize(x)
    if name == "posterize":
        return x & mask.to(torch.uint8)
    if name == "solarize":
        return torch.where(x >= thr.to(torch.uint8), 255 - x, x)
    if name == "color" and x.shape[1] == 1:
        # One channel: PIL's Color enhancement changes nothing.
        return x
    xf = x.float()
    if name == "autocontrast":
        out = autocontrast(xf)
    elif name == "sharpness":
        out = sharpen(xf, g)
    elif name == "brightness":
        out = xf * f
    else:
        gray = TF.rgb_to_grayscale(x).float() if x.shape[1] == 3 else xf
        if name == "color":
            degenerate = gray
        else:
            degenerate = gray.mean((-3, -2, -1), keepdim=True)
        out = add_rounded_once(xf * f, degenerate, g)
    return out.clamp(0, 255).to(torch.uint8)


def autocontrast(xf):
    """TF.autocontrast without its GPU sync: each channel stretched to [0, 255]."""
    lo = xf.amin((-2, -1), keepdim=True)
    hi = xf.amax((-2, -1), keepdim=True)
    flat = hi == lo
    return (xf - torch.where(flat, 0.0, lo)) / torch.where(flat, 1.0, (hi - lo) * (1 / 255))


def sharpen(xf, g):
    """Blend the inside with the 3x3-smoothed image (1 1 1, 1 5 1, 1 1 1) / 13; the border stays.

    The sums are exact integers and s / 13 is never a tie, so floor((s + 6) / 13) is TF's
    conv2d(...).round(). xf is changed in place and returned.
    """
    inside = xf[..., 1:-1, 1:-1]
    row_sums = xf[..., :-2] + xf[..., 1:-1] + xf[..., 2:]
    s = row_sums[..., :-2, :] + row_sums[..., 1:-1, :] + row_sums[..., 2:, :] + 4 * inside
    inside.copy_(add_rounded_once(inside, torch.floor((s + 6) / 13) - inside, g))
    return xf


def affine(x, theta):
    """Per-sample affine resampling (nearest, fill 128) by TF.affine's inverse matrices (n, 6)."""
    n, C, H, W = x.shape
    t = theta[..., None, None]
    gx = torch.linspace((1.0 - W) * 0.5, (W - 1.0) * 0.5, W, device=x.device)
    gy = torch.linspace((1.0 - H) * 0.5, (H - 1.0) * 0.5, H, device=x.device)[:, None]
    rows = (t[:, :3] / (0.5 * W), t[:, 3:] / (0.5 * H))
    grid = torch.stack([gx * a[:, 0] + gy * a[:, 1] + a[:, 2] for a in rows], -1)
    # Sampling x - 128 with zero padding fills the outside with 0 + 128, TF.affine's fill.
    out = F.grid_sample(x.float() - 128, grid, "nearest", "zeros", align_corners=False)
    return (out + 128).to(torch.uint8)


# ==== Models: nn.Sequential(body -> features, head -> logits); DEC clusters body(x) ==============
def build_model(arch, in_ch, classes, pretrained=False, weights=None):
    if arch == "small_cnn":
        return small_cnn(in_ch, classes)
    if arch.startswith("wrn28_"):
        # WRN-28-2 or WRN-28-8: the width is the number after the underscore.
        return wrn28(in_ch, classes, width=int(arch[6:]))
    return efficientnet_b0(in_ch, classes, pretrained, weights)


def conv_bn_relu(cin, cout):
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


def small_cnn(in_ch, classes):
    """Ours, for CPU runs: four 3x3 conv layers and 128 features."""
    body = nn.Sequential(
        *conv_bn_relu(in_ch, 32),
        *conv_bn_relu(32, 32),
        nn.MaxPool2d(2),
        *conv_bn_relu(32, 64),
        *conv_bn_relu(64, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return nn.Sequential(collections.OrderedDict(body=body, head=nn.Linear(128, classes)))


def efficientnet_b0(in_ch, classes, pretrained, weights):
    """The paper's backbone, torchvision's EfficientNet-B0, optionally with ImageNet weights."""
    if in_ch != 3:
        die("--arch efficientnet_b0 needs 3-channel images")
    m = torchvision.models.efficientnet_b0()
    imagenet = torchvision.models.EfficientNet_B0_Weights.IMAGENET1K_V1
    if weights:
        read_checkpoint(
            weights, "pass torchvision's efficientnet_b0 state_dict", use=m.load_state_dict
        )
    elif pretrained:
        # A download, or torch.hub's cache.
        try:
            m.load_state_dict(imagenet.get_state_dict(progress=False))
        except Exception as e:
            die(
                f"--pretrained: cannot download ({type(e).__name__}); place "
                f"{os.path.basename(imagenet.url)} in {torch.hub.get_dir()}/checkpoints/ "
                "or pass --weights FILE"
            )
    body = nn.Sequential(m.features, m.avgpool, nn.Flatten(), nn.Dropout(0.2))
    return nn.Sequential(collections.OrderedDict(body=body, head=nn.Linear(1280, classes)))


class WideBlock(nn.Module):
    """Pre-activation residual block of WRN-28 as FixMatch uses it (BN momentum 0.001, LeakyReLU).

    It follows the official TF code's residual(): activate_before_residual (the first block of the
    first group) feeds the activated input, not the raw one, to the shortcut.
    """

    def __init__(self, cin, cout, stride, activate_before_residual=False):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, momentum=0.001)
        self.bn2 = nn.BatchNorm2d(cout, momentum=0.001)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.short = None
        if cin != cout:
            self.short = nn.Conv2d(cin, cout, 1, stride, bias=False)
        self.abr = activate_before_residual

    def forward(self, x0):
        x = F.leaky_relu(self.bn1(x0), 0.1)
        if self.abr:
            x0 = x
        y = self.conv2(F.leaky_relu(self.bn2(self.conv1(x)), 0.1))
        if self.short is None:
            return y + x0
        return y + self.short(x0)


def wrn28(in_ch, classes, width=2):
    """Wide ResNet 28-width: 3 groups of 4 blocks, 28 = 6 * 4 + 4 layers (FixMatch's backbone)."""
    c = [16, 16 * width, 32 * width, 64 * width]
    blocks = []
    for group in range(3):
        for i in range(4):
            cin = c[group + 1] if i > 0 else c[group]
            stride = (1, 2, 2)[group] if i == 0 else 1
            first = group == 0 and i == 0
            blocks.append(WideBlock(cin, c[group + 1], stride, activate_before_residual=first))
    body = nn.Sequential(
        nn.Conv2d(in_ch, c[0], 3, 1, 1, bias=False),
        *blocks,
        nn.BatchNorm2d(c[3], momentum=0.001),
        nn.LeakyReLU(0.1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    model = nn.Sequential(collections.OrderedDict(body=body, head=nn.Linear(c[3], classes)))
    # The port's initialisation (kekmodel/FixMatch-pytorch).
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
        elif isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            nn.init.zeros_(m.bias)
    return model


# ==== The FixMatch step (Sohn et al. 2020, eq. 2-4), with KD-FixMatch's Heuristic 1 =============
def fixmatch_step(
    model,
    x_l,
    y_l,
    x_w=None,
    x_s=None,
    tau=0.95,
    lambda_u=1.0,
    trusted=None,
    loss="ce",
    alpha=0.1,
    beta=1.0,
    A=-4.0,
):
    """loss = CE(labeled) + lambda_u * the masked unlabeled loss over all mu*B strong views.

    Without x_w (the supervised floor) only the labeled term. trusted: the inner SNN's outer
    labels (-1 = not trusted), used by Heuristic 1. -> (loss, dict of its parts).
    """
    if x_w is None:
        logits = model(x_l).float()
        loss_s = F.cross_entropy(logits, y_l)
        return loss_s, dict(loss_s=loss_s.detach())
    # One forward pass over the labeled, weak and strong images: BatchNorm normalises them
    # together, as in the official code.
    B = len(x_l)
    logits = model(torch.cat([x_l, x_w, x_s])).float()
    loss_s = F.cross_entropy(logits[:B], y_l)
    logits_w, logits_s = logits[B:].chunk(2)
    # The pseudo label comes from the weak view, without gradient.
    loss_u, mask, pseudo = unlabeled_loss(
        logits_w.detach(),
        logits_s,
        tau=tau,
        trusted=trusted,
        loss=loss,
        alpha=alpha,
        beta=beta,
        A=A,
    )
    total = loss_s + lambda_u * loss_u
    parts = dict(loss_s=loss_s.detach(), loss_u=loss_u.detach(), mask=mask, pseudo=pseudo)
    return total, parts


def unlabeled_loss(logits_w, logits_s, tau, trusted=None, loss="ce", alpha=0.1, beta=1.0, A=-4.0):
    """FixMatch's unlabeled term; in the inner SNN with Heuristic 1 and CE or SCE.

    FixMatch, for each of the mu*B unlabeled images b:
        q_b      = softmax(logits_w[b])      the weak view's prediction
        m_b      = 1[max q_b >= tau]         the mask
        target_b = argmax q_b                the pseudo label
    Heuristic 1 (the inner SNN; our reading): where m_b = 0 but the outer SNN's label trusted_b
    is known (>= 0), target_b = trusted_b and m_b = 1; the other rows stay masked.
        loss_u   = 1/(mu B) sum_b m_b H(target_b, logits_s[b]),   H = CE, or SCE (sce_loss)

    The mean runs over all mu*B rows, masked ones included, as in the official code. On a GPU the
    fused kernel (kernels.masked_pseudo_label_loss) computes the same in one launch.
    -> (loss_u, mask as float (mu*B,), target (mu*B,)).
    """
    if logits_s.is_cuda:
        return kernels.masked_pseudo_label_loss(
            logits_w, logits_s, tau, trusted, loss, alpha, beta, A, check=False
        )
    probs = logits_w.float().softmax(-1)
    confidence, target = probs.max(-1)
    mask = confidence >= tau
    if trusted is not None:
        use_outer = ~mask & (trusted >= 0)
        target = torch.where(use_outer, trusted.to(target.dtype), target)
        mask = mask | use_outer
    if loss == "sce":
        per_sample = sce_loss(logits_s, target, alpha, beta, A)
    else:
        per_sample = F.cross_entropy(logits_s.float(), target, reduction="none")
    # torch.where, not a product: a masked row's infinite loss stays out of the mean.
    loss_u = torch.where(mask, per_sample, torch.zeros_like(per_sample)).mean()
    return loss_u, mask.float(), target


# ==== KD-FixMatch: high-confidence sampling, then deep embedding clustering =====================
# The outer SNN's EMA model labels every unlabeled image. Its confident labels are candidates;
# DEC clusters the candidates' features, and a candidate is trusted when its cluster, mapped to a
# class, agrees with its label. The paper gives the steps; the matching of clusters to classes
# (Hungarian, on the cluster x label table) is our reading.
def select_confident(probs, tau_select=0.80):
    """Indices and pseudo labels of the samples whose max softmax probability >= tau_select."""
    confidence, labels = probs.max(1)
    idx = torch.nonzero(confidence >= tau_select).squeeze(1)
    return idx, labels[idx]


def dec_cluster(
    z, pseudo, classes, max_iters=2000, lr=0.01, batch=256, tol=1e-3, n_init=20, seed=0
):
    """DEC (Xie et al. 2016) on features z, then clusters -> classes by Hungarian matching.

    k-means initialises the centroids; SGD minimises KL(P || Q) until fewer than tol of the points
    change cluster between target updates (or max_iters steps).
    -> (keep: the sample's cluster agrees with its pseudo label, info).
    """
    z = z.float()
    n, k = len(z), classes
    if n < k:
        # Too few candidates for k clusters: none is trusted.
        return torch.zeros(n, dtype=torch.bool), dict(iters=0, moved=0.0)
    centroids, steps, moved = dec_fit(z, k, max_iters, lr, batch, tol, n_init, seed)
    with torch.no_grad():
        clusters = kernels.dec_soft_assign(z, centroids).argmax(1).cpu()
    pseudo = pseudo.cpu()
    table = torch.zeros(k, k, dtype=torch.long).index_put_(
        (clusters, pseudo), torch.tensor(1), True
    )
    to_class = torch.tensor(linear_sum_assignment(table.numpy(), maximize=True)[1])
    keep = to_class[clusters] == pseudo
    return keep, dict(iters=steps, moved=moved, cluster_to_class=to_class.tolist())


def dec_fit(z, k, max_iters, lr, batch, tol, n_init, seed):
    """DEC's k centroids on fixed features z. -> (centroids, SGD steps taken, share moved last)."""
    n = len(z)
    centers = kmeans(z.cpu().numpy(), k, n_init, seed)
    centroids = torch.tensor(centers, dtype=torch.float32, device=z.device, requires_grad=True)
    opt = torch.optim.SGD([centroids], lr=lr, momentum=0.9)
    g = torch.Generator(z.device).manual_seed(seed)
    # The target P is recomputed once per pass over the data.
    steps_per_pass = max(1, math.ceil(n / batch))
    assign = None
    moved = 1.0
    steps = 0
    for it in range(max_iters):
        if it % steps_per_pass == 0:
            with torch.no_grad():
                q = kernels.dec_soft_assign(z, centroids)
                # DEC's target: p_ij = q_ij^2 / f_j, normalised over j, with f_j = sum_i q_ij.
                p = q**2 / q.sum(0)
                p = p / p.sum(1, keepdim=True)
                new = q.argmax(1)
            if assign is not None:
                moved = (new != assign).float().mean().item()
            if moved < tol:
                break
            assign = new
        # One SGD step on KL(P || Q) for a batch drawn with replacement.
        i = torch.randint(n, (min(batch, n),), generator=g, device=z.device)
        qb = kernels.dec_soft_assign(z[i], centroids)
        kl = (p[i] * (p[i].clamp_min(1e-12).log() - qb.clamp_min(1e-12).log())).sum(1).mean()
        opt.zero_grad()
        kl.backward()
        opt.step()
        steps += 1
    return centroids, steps, moved


def kmeans(z, k, n_init, seed):
    """The centres of KMeans(k, n_init=n_init, random_state=seed).fit(z), with a progress bar.

    The restarts run one at a time, drawing from one random state in turn, and a restart wins
    when its inertia is lower and its clustering differs, as in KMeans.fit: the same centres, bit
    for bit, and no minutes of silence when there are many restarts on many points.
    """
    random_state = np.random.RandomState(seed)
    best = None
    interval = 0.5 if sys.stderr.isatty() else 30
    for _ in tqdm(range(n_init), desc="k-means", mininterval=interval, maxinterval=60):
        km = KMeans(k, n_init=1, random_state=random_state).fit(z)
        if best is None:
            best = km
        elif km.inertia_ < best.inertia_ and not same_clustering(km.labels_, best.labels_):
            best = km
    return best.cluster_centers_


def same_clustering(a, b):
    """Each cluster of labelling a is one cluster of b (scikit-learn's _is_same_clustering)."""
    pairs = np.unique(np.stack([a, b]), axis=1)
    return len(pairs[0]) == len(np.unique(pairs[0]))


def trusted_subset(args, data, outer):
    """The outer EMA model labels the unlabeled set -> select_confident -> dec_cluster.

    The unlabeled set is every training image, the labeled ones included, as in FixMatch.

    -> dict(trusted: the outer label of each unlabeled image, -1 where not trusted; stats).
    Cached in trusted.pt, so a resumed run does not redo it.
    """
    path = os.path.join(args.out, "trusted.pt")
    if os.path.exists(path):
        return read_trusted(path, data)
    y = data["train_y"]
    logits, feats = evaluate(outer, data["x"], y, args, features=True)
    pseudo = logits.argmax(1)
    top, top_share = top_class(pseudo, data["classes"])
    idx, labels = select_confident(logits.softmax(1), args.tau_select)
    if args.no_dec:
        keep, info = torch.ones(len(idx), dtype=torch.bool), dict(iters=0)
    else:
        keep, info = dec_cluster(
            feats[idx].to(args.dev),
            labels,
            data["classes"],
            max_iters=args.dec_max_iters,
            lr=args.dec_lr,
            batch=args.dec_batch,
            tol=args.dec_tol,
            n_init=args.kmeans_init,
            seed=args.seed,
        )
    trusted = torch.full_like(y, -1).index_put_((idx[keep],), labels[keep])
    stats = dict(
        unlabeled=len(y),
        outer_pseudo_label_precision=precision(pseudo, y),
        confident_size=len(idx),
        confident_precision=precision(labels, y[idx]),
        trusted_size=int(keep.sum()),
        trusted_precision=precision(labels[keep], y[idx[keep]]),
        dec_iters=info["iters"],
        outer_top_class=top,
        outer_top_class_share=top_share,
    )
    out = dict(trusted=trusted, stats=stats)
    save(path, out)
    return out


def precision(labels, truth):
    """The share of labels that are right; None for no labels."""
    if len(labels) == 0:
        return None
    return (labels == truth).float().mean().item()


# ==== The inner SNN: Heuristic 1 and symmetric cross entropy ====================================
# The inner SNN is a fresh FixMatch network with its own threshold tau_inner. Its unlabeled term
# (unlabeled_loss above) takes the trusted outer label where its own weak view is not confident
# (Heuristic 1), and may use symmetric cross entropy (--loss sce), which is robust to the noise
# that the outer labels still carry. SCE replaces CE in the inner SNN's unlabeled term only.
def sce_loss(logits, target, alpha=0.1, beta=1.0, A=-4.0):
    """Per-sample symmetric cross entropy (Wang et al. 2019): alpha CE + beta RCE.

    RCE = -sum_k p_k log q_k for the one-hot label q, with log 0 := A, is -A (1 - p_y).
    """
    log_p_y = logits.float().log_softmax(-1).gather(-1, target[:, None]).squeeze(-1)
    ce = -log_p_y
    return alpha * ce - beta * A * (1 - log_p_y.exp())


# ==== Suave (Fini et al. 2023): cluster prototypes are class prototypes, one cross entropy =======
# A second baseline, the project's starting document. Unlabeled images are assigned to the class
# prototypes by Sinkhorn-Knopp on one view and predict that assignment from the other view
# (SwAV's swapped prediction); labeled images use the same head with their label.
class Prototypes(nn.Linear):
    """Unit prototypes, renormalised in place before each forward (Suave's code); fp32 cosines."""

    def forward(self, x):
        with torch.no_grad():
            self.weight.copy_(F.normalize(self.weight, dim=1))
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(F.normalize(x.float(), dim=1), self.weight)


def suave_head(in_dim, classes, hidden=2048, dim=128):
    """Suave's projector (Linear, BN, ReLU, Linear) and one prototype per class."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(),
        nn.Linear(hidden, dim),
        Prototypes(dim, classes, bias=False),
    )


@torch.no_grad()
def sinkhorn(scores, eps=0.05, iters=3):
    """SwAV's Sinkhorn-Knopp: scores (B, K) -> assignments; rows sum to 1, classes used equally.

    Under torchrun the sums over the batch run over every process's share, as in SwAV's
    distributed_sinkhorn (facebookresearch/swav, main_swav.py), so the assignments are the
    one-process batch's.
    """
    # Subtracting the maximum cancels in the normalising; the floor keeps a small eps that
    # underflows from dividing 0 by 0.
    top = over_processes(scores.max(), dist.ReduceOp.MAX)
    q = torch.exp((scores - top) / eps).clamp_min(1e-30).T
    q /= over_processes(q.sum())
    K, rows = q.shape
    # B is the whole batch, every process's rows: each sample's mass is 1/B of it.
    B = rows
    if distributed():
        B = rows * dist.get_world_size()
    for _ in range(iters):
        # Each prototype gets mass 1/K, then each sample mass 1/B.
        q /= K * over_processes(q.sum(1, keepdim=True))
        q /= B * q.sum(0, keepdim=True)
    return (q * B).T


def over_processes(t, op=None):
    """t reduced by op (a dist.ReduceOp; a sum by default) over torchrun's processes.

    In one process: t itself.
    """
    if not distributed():
        return t
    if op is None:
        op = dist.ReduceOp.SUM
    dist.all_reduce(t, op)
    return t


def distributed():
    """Whether this process is one of torchrun's several (its process group is up)."""
    return dist.is_available() and dist.is_initialized()


def swapped_prediction(target, scores, temperature):
    """Cross entropy of the other view's Sinkhorn assignment against these scores."""
    return -(target * (scores / temperature).log_softmax(1)).sum(1).mean()


def suave_step(model, x_l, y_l, x_1, x_2, temperature=0.1, eps=0.05, iters=3, smoothing=0.01):
    """Smoothed CE + swapped Sinkhorn prediction, weighted B/(B+2U), 2U/(B+2U) as Suave's code."""
    B, U = len(x_l), len(x_1)
    # Cosine scores in [-1, 1]: labeled, first view, second view.
    scores = model(torch.cat([x_l, x_1, x_2])).float()
    s_l = scores[:B]
    s_1, s_2 = scores[B:].chunk(2)
    t_1 = sinkhorn(s_1.detach(), eps, iters)
    t_2 = sinkhorn(s_2.detach(), eps, iters)
    loss_u = (
        swapped_prediction(t_1, s_2, temperature) + swapped_prediction(t_2, s_1, temperature)
    ) / 2
    loss_l = F.cross_entropy(s_l / temperature, y_l, label_smoothing=smoothing)
    loss = (B * loss_l + 2 * U * loss_u) / (B + 2 * U)
    parts = dict(
        loss_s=loss_l.detach(),
        loss_u=loss_u.detach(),
        mask=torch.ones(U, device=scores.device),
        pseudo=t_1.argmax(1),
    )
    return loss, parts


# ==== Training one siamese network: the outer, the inner, the supervised floor or Suave =========
STAGES = ("outer", "inner", "supervised", "suave")


def lr_factor(k, K):
    """FixMatch's schedule: LambdaLR multiplies --lr (eta) by cos(7 pi k / (16 K)) at step k."""
    return math.cos(7 * math.pi * k / (16 * K))


def ema_decay(step, ema, warmup):
    """The EMA's decay at a step: FixMatch's constant, or with the warm-up min(ema, (1+k)/(10+k)).

    The warm-up (ours) lets a short run's EMA model forget its random initial weights.
    """
    if warmup:
        return min(ema, (1 + step) / (10 + step))
    return ema


def update_ema(ema, model, step, args):
    """The EMA of the parameters; BatchNorm's running statistics are copied as they are."""
    decay = ema_decay(step, args.ema, args.ema_warmup)
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
    torch._foreach_copy_(list(ema.buffers()), list(model.buffers()))


def ema_warmup_record(args):
    """For results.json: the warm-up on or off; by the default rule or by a flag against it."""
    share = constant_ema_initial_share(args)
    by_rule = share > EMA_INITIAL_SHARE_MAX
    by = "default" if args.ema_warmup == by_rule else "flag"
    return dict(on=args.ema_warmup, by=by, constant_ema_initial_share=share)


def announce_ema(args):
    """The run's first line: the EMA warm-up and why. -> the warnings it gives (a list)."""
    record = ema_warmup_record(args)
    share = f"{100 * record['constant_ema_initial_share']:.2f} %"
    state = "on" if args.ema_warmup else "off"
    if record["by"] == "flag":
        state += " (--ema-warmup)" if args.ema_warmup else " (--no-ema-warmup)"
    print(
        f"EMA warm-up {state}: a constant {args.ema} EMA would hold {share} of its random initial "
        f"weights at step {args.steps} (the default warms up above 1 %)"
    )
    if args.ema_warmup or record["by"] == "default":
        return []
    return warn(
        f"--no-ema-warmup: the constant {args.ema} EMA still holds {share} of its random initial "
        f"weights at step {args.steps}, so the model that is evaluated (and labels) is mostly "
        "untrained; drop --no-ema-warmup, or train more --steps"
    )


def warn(message):
    """A warning: one line on stderr now, and in results.json's list (returned as [message])."""
    print(f"kdfixmatch.py: warning: {message}", file=sys.stderr)
    return [message]


def snn_model(args, data, suave=False, imagenet=True):
    """The network of one SNN on the device; Suave's has its projector and prototypes."""
    model = build_model(
        args.arch,
        data["train_x"].shape[1],
        data["classes"],
        pretrained=imagenet and args.pretrained,
        weights=args.weights if imagenet else None,
    )
    if suave:
        # Suave: a projector and cosine prototypes replace the linear head.
        in_dim = model.head.in_features
        model.head = suave_head(in_dim, data["classes"], args.suave_hidden, args.suave_dim)
    return model.to(args.dev, memory_format=torch.channels_last)


def make_model(args, data, suave=False):
    """-> model, forward (under torchrun: DDP; --compile: compiled), EMA, Nesterov SGD, schedule."""
    model = snn_model(args, data, suave)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    if batchnorm_kind(args) == "sync":
        # The same Parameter objects, in SyncBatchNorm layers: BatchNorm over the global batch.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # Weight decay on conv and linear weights only: not on biases, BatchNorm or the prototypes
    # (Suave's code gives them LARS decay 1e-6; none is our choice).
    prototypes = {
        id(p) for m in model.modules() if isinstance(m, Prototypes) for p in m.parameters()
    }
    decayed, not_decayed = [], []
    for p in model.parameters():
        if p.ndim > 1 and id(p) not in prototypes:
            decayed.append(p)
        else:
            not_decayed.append(p)
    groups = [
        dict(params=decayed, weight_decay=args.wd),
        dict(params=not_decayed, weight_decay=0.0),
    ]
    opt = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=args.momentum > 0)
    K = args.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(k, K))
    forward = model
    if args.compile:
        # On a GPU, CUDA graphs remove the launch overhead of the many small kernels. Not with
        # DDP, whose gradient communication runs between the graphs (and is not measured here).
        cuda_graphs = args.dev.type == "cuda" and args.world_size == 1
        forward = torch.compile(model, mode="reduce-overhead" if cuda_graphs else None)
    if args.world_size > 1:
        # DistributedDataParallel averages the gradients over the processes during backward. It
        # also starts every process from rank 0's weights and, at each forward, rank 0's
        # BatchNorm statistics. It wraps the compiled model: compiling the DDP wrapper instead
        # stops at its first graph break and compiles nothing (torch 2.14, seen on a CPU).
        device_ids = [args.dev] if args.dev.type == "cuda" else None
        forward = nn.parallel.DistributedDataParallel(forward, device_ids=device_ids)
    return model, forward, ema, opt, sched


def to_device(t, dev):
    """A host -> GPU copy from pinned memory, which does not wait for the GPU."""
    if dev.type == "cuda" and not t.is_cuda:
        return t.pin_memory().to(dev, non_blocking=True)
    return t.to(dev)


def to_input(x, args):
    """uint8 images -> normalised float on the device, channels_last."""
    x = (to_device(x, args.dev).float() / 255 - args.mean) / args.std
    return x.contiguous(memory_format=torch.channels_last)


# Drawn once per epoch, not once per batch.
@functools.lru_cache(maxsize=8)
def epoch_permutation(n, seed, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))


def batch_images(data, pool, step, size, order_seed, args):
    """Batch `step` of `size` indices into pool (None: every training image), and their images.

    Each stream (labeled, unlabeled) walks through its own permutation per epoch. Under torchrun
    this process keeps its share of the indices.
    """
    dev = args.dev
    n = len(data["train_y"]) if pool is None else len(pool)
    pos = step * size
    first_epoch = pos // n
    last_epoch = (pos + size - 1) // n
    slices = []
    for e in range(first_epoch, last_epoch + 1):
        slices.append(epoch_permutation(n, order_seed, e)[max(0, pos - e * n) : pos + size - e * n])
    host = share_of_this_process(torch.cat(slices), args)
    if pool is not None:
        host = pool[host]
    idx = to_device(host, dev)
    if data["x"].is_cuda:
        x = data["x"][idx]
    else:
        x = to_device(data["x"][host], dev)
    return idx, x


def make_batch(data, split, step, seed, args, unlabeled=True):
    """Batch `step`: B labeled and mu*B unlabeled images, augmented; a function of (seed, step).

    Under torchrun every process draws the whole batch's indices and augmentations, and builds
    only its share of the images: the N shares, in rank order, are the one-process batch.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    flip = data["flip"]
    H, W = data["x"].shape[-2:]
    B = args.batch_size
    idx_l, x_l = batch_images(data, split, step, B, 2 * seed, args)
    weak_l = draw_plan(B, H, W, flip, False, g)
    b = dict(x_l=apply_plan(x_l, plan_share(weak_l, args)), y_l=data["y"][idx_l])
    if not unlabeled:
        return b
    U = args.mu * B
    idx_u, x_u = batch_images(data, None, step, U, 2 * seed + 1, args)
    weak_u = draw_plan(U, H, W, flip, False, g)
    strong_u = draw_plan(U, H, W, flip, True, g)
    b.update(x_u=apply_plan(x_u, plan_share(weak_u, args)), y_u=data["y"][idx_u])
    b.update(x_s=apply_plan(x_u, plan_share(strong_u, args)), idx_u=idx_u)
    return b


def share_of_this_process(rows, args):
    """This process's 1/N of the rows, the rank-th of N equal parts (in one process, all)."""
    return rows.tensor_split(args.world_size)[args.rank]


def plan_share(plan, args):
    """This process's rows of an augmentation plan (drawn for the whole batch)."""
    return {name: share_of_this_process(column, args) for name, column in plan.items()}


def batches(data, split, steps, seed, args, unlabeled=True, prefetch=None):
    """make_batch per step; on a GPU the next is built on a side stream while the step trains."""
    if prefetch is None:
        prefetch = args.dev.type == "cuda"
    if not prefetch:
        for step in steps:
            yield make_batch(data, split, step, seed, args, unlabeled)
        return
    side = torch.cuda.Stream(args.dev) if args.dev.type == "cuda" else None

    def build(step):
        # torch.cuda.stream(None) does nothing: on a CPU the batch is built in the thread alone.
        with torch.cuda.stream(side):
            b = make_batch(data, split, step, seed, args, unlabeled)
            done = side.record_event() if side else None
            return b, done

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        upcoming = [pool.submit(build, s) for s in steps[:1]]
        for i in range(len(steps)):
            b, done = upcoming[0].result()
            upcoming = [pool.submit(build, s) for s in steps[i + 1 : i + 2]]
            if side:
                # The step waits for its batch, and the allocator keeps the batch for the step.
                torch.cuda.current_stream().wait_event(done)
                for t in b.values():
                    t.record_stream(torch.cuda.current_stream())
            yield b


def train_step(args, model, ema, opt, sched, stage, b, trusted, step):
    """One SGD update and the EMA -> (loss, mask rate, right, used, labeled loss), no GPU sync."""
    if args.compile and args.dev.type == "cuda":
        # The last step's CUDA graph outputs are done with.
        torch.compiler.cudagraph_mark_step_begin()
    # The batch's x_u holds the unlabeled images' weak views, x_s their strong views.
    x_l, x_w, x_s = [to_input(b[k], args) if k in b else None for k in ("x_l", "x_u", "x_s")]
    with torch.autocast(args.dev.type, torch.bfloat16, enabled=args.bf16):
        if stage == "suave":
            loss, s = suave_step(
                model,
                x_l,
                b["y_l"],
                x_w,
                x_s,
                temperature=args.suave_temperature,
                eps=args.sinkhorn_eps,
                iters=args.sinkhorn_iters,
                smoothing=args.label_smoothing,
            )
        else:
            if trusted is None:
                # The outer SNN (and the supervised floor): FixMatch as published.
                tau = args.tau
                batch_trusted = None
                loss_name = "ce"
            else:
                # The inner SNN: its own threshold, this batch's trusted outer labels for
                # Heuristic 1, and the unlabeled loss of --loss (CE or SCE).
                tau = args.tau_inner
                batch_trusted = trusted[b["idx_u"]]
                loss_name = args.loss
            loss, s = fixmatch_step(
                model,
                x_l,
                b["y_l"],
                x_w,
                x_s,
                tau=tau,
                lambda_u=args.lambda_u,
                trusted=batch_trusted,
                loss=loss_name,
                alpha=args.sce_alpha,
                beta=args.sce_beta,
                A=args.sce_A,
            )
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    with torch.no_grad():
        update_ema(ema, model, step, args)
        if "mask" not in s:
            # The supervised floor has no pseudo labels.
            return torch.stack([loss.detach(), *loss.new_zeros(3), s["loss_s"]])
        used = s["mask"] > 0
        right = (used & (s["pseudo"] == b["y_u"])).sum()
        stats = [loss.detach(), s["mask"].mean(), right, used.sum(), s["loss_s"]]
        return torch.stack(stats).float()


def train_snn(args, data, stage, split, trusted=None):
    """One SNN (outer; inner, given `trusted`; floor; Suave) for K steps. -> (EMA, summary).

    Under torchrun every process trains; rank 0 alone evaluates, writes and returns the summary
    (the others return None).
    """
    final = os.path.join(args.out, f"{stage}.pt")
    ckpt = os.path.join(args.out, f"ckpt_{stage}.pt")
    if os.path.exists(final):
        return load_final(args, data, final, stage)
    K = args.steps
    seed = args.seed * 1000 + STAGES.index(stage)
    # The global RNG serves only the initial weights and EfficientNet's dropout: batches and
    # their augmentation come from (seed, step) generators in make_batch.
    torch.manual_seed(seed)
    model, forward, ema, opt, sched = make_model(args, data, suave=stage == "suave")
    if args.rank > 0:
        # The same initial weights everywhere (the seed above); dropout then draws from each
        # process's own stream, as a one-process batch draws a mask per image.
        torch.manual_seed(seed + 1_000_003 * args.rank)
    st = dict(step=0, evals=[], train_s=0.0, pl_hit=0, pl_n=0)
    if os.path.exists(ckpt):
        # Every process resumes from the same checkpoint.
        st = restore(ckpt, model, ema, opt, sched, args)
    lead = args.rank == 0
    if lead:
        trim_metrics(args, stage, st["step"])
    if trusted is not None:
        # Checked once here, so that the steps need not (on a GPU that check is a sync).
        trusted = kernels.check_trusted(trusted, data["classes"]).to(args.dev)
    bar = progress_bar(stage, st["step"], K, quiet=not lead)
    curves = open_curves(args, stage, st["step"])
    window = []
    t0 = time.time()
    float_state = floating_state(model, ema)
    steps = range(st["step"], K)
    stream = batches(data, split, steps, seed, args, unlabeled=stage != "supervised")
    for step, b in zip(bar, stream):
        window.append(train_step(args, forward, ema, opt, sched, stage, b, trusted, step))
        done = step + 1
        evaluate_now = done % args.eval_every == 0 or done == K
        # The GPU runs ahead of the host: its statistics are read back every 32 steps.
        if done % 32 and not evaluate_now:
            continue
        acc = 0.0
        if evaluate_now and lead:
            acc = evaluate(ema, data["test_x"], data["test_y"], args)
        w, norms, acc = read_back(args, window, float_state, acc)
        window = []
        tally(st, w, done, time.time() - t0)
        stop_if_diverged(args, stage, w, acc, norms, done, bar)
        row = metrics_row(stage, w, sched, st)
        images_per_s = len(w) * images_per_step(args, stage) / max(time.time() - t0, 1e-9)
        log_curves(curves, done, dict(row, images_per_s=images_per_s, test_acc=acc), evaluate_now)
        if evaluate_now:
            st["evals"].append(acc)
            # A collective: every process gives its random states; rank 0 writes the checkpoint.
            rngs = random_states(args)
            if lead:
                log_metrics(args, dict(stage=stage, step=done, test_acc=acc, **row))
                save_checkpoint(ckpt, model, ema, opt, sched, st, args, rngs)
        show_progress(bar, row, st["evals"])
        t0 = time.time()
    bar.close()
    if curves is not None:
        curves.close()
    if not lead:
        return ema, None
    return ema, finish_stage(args, data, stage, ema, st, final, ckpt)


def finish_stage(args, data, stage, ema, st, final, ckpt):
    """The stage's summary, its EMA model saved as `final`, the checkpoint removed."""
    summary = summarize(st, args.steps, images_per_step(args, stage))
    summary.update(prediction_summary(ema, data, args))
    save(final, dict(ema=ema.state_dict(), summary=summary, args=vars_of(args)))
    os.remove(ckpt)
    return summary


def read_back(args, window, float_state, acc):
    """The window's step statistics, weight magnitudes and rank 0's test accuracy, on the host.

    The magnitudes (the largest of each weight and BatchNorm statistic) serve the NaN stop.

    Under torchrun they come from every process in one all_reduce: the statistics are the
    whole batch's, and every process sees the same values, so all stop at the same step.
    """
    w = torch.stack(window)
    norms = torch.stack(torch._foreach_norm(float_state, math.inf))
    if args.world_size == 1:
        return w.cpu(), norms.cpu(), acc
    rank_0_acc = torch.tensor([acc], dtype=torch.float64, device=w.device)
    packed = torch.cat([w.double().flatten(), norms.double(), rank_0_acc])
    dist.all_reduce(packed)
    w_sum, norms_sum, acc_sum = packed.cpu().split([w.numel(), len(norms), 1])
    # The loss, the mask rate and the labeled loss are means over equal shares: their mean is the
    # batch's. The pseudo-label counts (right, used) add up. A sum of magnitudes is finite when
    # every process's is. The other ranks added 0 to the accuracy.
    w = w_sum.view(w.shape)
    w[:, MEAN_COLUMNS] /= args.world_size
    return w, norms_sum, acc_sum.item()


# train_step's statistics that are means over a process's share (loss, mask rate, labeled loss);
# the others (pseudo labels right, used) are counts.
MEAN_COLUMNS = [0, 1, 4]


def tally(st, w, done, seconds):
    """A read-back window into the training state `st`.

    Steps and seconds so far, pseudo labels right and used, and the labeled loss at the first
    read-back and at the latest (did the model fit its labels?).
    """
    st["step"] = done
    st["train_s"] += seconds
    st["pl_hit"] += int(w[:, 2].sum())
    st["pl_n"] += int(w[:, 3].sum())
    labeled_loss = float(w[:, 4].mean())
    st.setdefault("labeled_loss_first", labeled_loss)
    st["labeled_loss_last"] = labeled_loss


def floating_state(*models):
    """Weights and BatchNorm statistics: checked for non-finite values at each read-back."""
    return [t for m in models for t in m.state_dict().values() if t.is_floating_point()]


def open_curves(args, stage, start):
    """--tensorboard: a writer in --out/tensorboard/<stage>; a resumed stage drops later events."""
    if not args.tensorboard or args.rank != 0:
        return None
    from torch.utils.tensorboard import SummaryWriter

    log_dir = os.path.join(args.out, "tensorboard", stage)
    return SummaryWriter(log_dir, purge_step=start if start else None)


def log_curves(curves, step, values, evaluated):
    """The step statistics at each read-back, the EMA model's test accuracy at evaluations."""
    if curves is None:
        return
    for name, value in values.items():
        if value is None:
            continue
        if name == "test_acc" and not evaluated:
            continue
        curves.add_scalar(name, value, step)


def log_trusted_curves(args, stats):
    """--tensorboard: the confident and trusted subsets' sizes and precisions, at step 0."""
    curves = open_curves(args, "trusted", 0)
    if curves is None:
        return
    for name, value in stats.items():
        if value is not None:
            curves.add_scalar(name, value, 0)
    curves.close()


def show_progress(bar, row, evals):
    postfix = {k: "-" if v is None else f"{v:.4g}" for k, v in row.items()}
    test = f"{evals[-1]:.3f}" if evals else "-"
    bar.set_postfix(postfix, test=test, refresh=False)


def images_per_step(args, stage):
    """B labeled images, plus the weak and strong views of mu*B unlabeled ones."""
    if stage == "supervised":
        return args.batch_size
    return args.batch_size * (1 + 2 * args.mu)


def progress_bar(stage, start, K, quiet=False):
    """tqdm; to a log file (not a terminal) a line per 30 s rather than per update.

    quiet: none at all (torchrun's ranks other than 0).
    """
    interval = 0.5 if sys.stderr.isatty() else 30
    return tqdm(
        range(start, K),
        initial=start,
        total=K,
        desc=stage,
        dynamic_ncols=True,
        mininterval=interval,
        maxinterval=60,
        disable=quiet,
    )


def metrics_row(stage, w, sched, st):
    """The last step's loss and lr; with pseudo labels, the mask rate and their precision so far.

    In the inner SNN the mask also counts the rows that Heuristic 1 fills with a trusted outer
    label, so its rate is not comparable with the outer SNN's confidence-only rate.
    """
    row = dict(loss=float(w[-1, 0]), lr=sched.get_last_lr()[0])
    if stage != "supervised":
        row["mask"] = float(w[-1, 1])
        row["pl_precision"] = st["pl_hit"] / st["pl_n"] if st["pl_n"] else None
    return row


def summarize(st, K, per_step):
    """A stage's results; FixMatch reports the median of the last 20 evaluations."""
    evals = st["evals"]
    median20 = float(np.median(evals[-20:])) if len(evals) >= 20 else None
    precision_pl = st["pl_hit"] / st["pl_n"] if st["pl_n"] else None
    return dict(
        test_acc=evals[-1],
        evals=len(evals),
        test_acc_median20=median20,
        train_s=st["train_s"],
        images_per_s=K * per_step / max(st["train_s"], 1e-9),
        pseudo_label_precision=precision_pl,
        labeled_loss_first=st.get("labeled_loss_first"),
        labeled_loss_last=st.get("labeled_loss_last"),
    )


def evaluate(model, x, y, args, features=False):
    """Accuracy of `model` on uint8 images x; with features=True returns (logits, features)."""
    with torch.no_grad(), torch.autocast(args.dev.type, torch.bfloat16, enabled=args.bf16):
        model.eval()
        feats = [model.body(to_input(x[i : i + 1024], args)) for i in range(0, len(x), 1024)]
        logits = torch.cat([model.head(f).float().cpu() for f in feats])
    if features:
        return logits, torch.cat([f.float().cpu() for f in feats])
    if not logits.isfinite().all():
        return math.nan
    return (logits.argmax(1) == y).float().mean().item()


# ==== Is it a trained model? The evaluated model, and DEC's input, against chance ================
# A model at chance level, or one that predicts one class for nearly every image, has failed,
# whatever its loss says. The run still reports what it measured, and says so in one line with the
# likely causes. "Nearly every": at least this share of the images, when the data's own share of
# that class is 5 points lower or more.
ONE_CLASS_SHARE = 0.9


def prediction_summary(model, data, args):
    """The class the model predicts most often on the test images, and for what share of them."""
    logits = evaluate(model, data["test_x"], data["test_y"], args, features=True)[0]
    top, share = top_class(logits.argmax(1), data["classes"])
    return dict(top_class=top, top_class_share=share)


def top_class(labels, classes):
    """-> (the most frequent label, its share of all labels)."""
    counts = torch.bincount(labels, minlength=classes)
    top = int(counts.argmax())
    return top, counts[top].item() / max(1, len(labels))


def is_one_class(share, top, truth):
    """Nearly all predictions are one class, far more than the images of that class."""
    true_share = (truth == top).float().mean().item()
    return share >= ONE_CLASS_SHARE and share >= true_share + 0.05


def is_near_chance(acc, classes, n):
    """Within three binomial standard deviations of 1/classes on n images (at least 2 points)."""
    chance = 1 / classes
    margin = max(0.02, 3 * math.sqrt(chance * (1 - chance) / n))
    return acc <= chance + margin


def likely_causes(args):
    """Why a model may not have learned, for this run's flags."""
    share = constant_ema_initial_share(args)
    if not args.ema_warmup and share > EMA_INITIAL_SHARE_MAX:
        return (
            f"its EMA still holds {100 * share:.2f} % of its random initial weights at step "
            f"{args.steps} (drop --no-ema-warmup, or train more --steps)"
        )
    return f"too few steps (--steps {args.steps}), or --lr {args.lr} too high or too low"


def stage_warning(stage, summary, data, args):
    """One line when a stage's evaluated model is at chance level or predicts one class."""
    share = summary.get("top_class_share")
    first = summary.get("labeled_loss_first")
    last = summary.get("labeled_loss_last")
    if share is None or first is None:
        # A stage finished by an earlier version of this program: not checked.
        return None
    acc, classes, test_y = summary["test_acc"], data["classes"], data["test_y"]
    one_class = is_one_class(share, summary["top_class"], test_y)
    at_chance = is_near_chance(acc, classes, len(test_y))
    loss_fell = last <= first / 2
    if not (one_class or (at_chance and loss_fell)):
        return None
    what = f"tests at {pct(acc)}"
    if at_chance:
        what += f", chance level (1/{classes})"
    if one_class:
        top = summary["top_class"]
        what = f"predicts one class ({top}) for {100 * share:.1f} % of the test images and {what}"
    return (
        f"{stage} SNN: its EMA model {what}, while its labeled loss went from {first:.3g} to "
        f"{last:.3g}; likely causes: {likely_causes(args)}"
    )


def trusted_warning(stats, data, args):
    """One line when the outer model labels the unlabeled set with one class, or at chance."""
    share = stats.get("outer_top_class_share")
    if share is None:
        return None
    y, top, right = data["train_y"], stats["outer_top_class"], stats["outer_pseudo_label_precision"]
    one_class = is_one_class(share, top, y)
    at_chance = is_near_chance(right, data["classes"], len(y))
    if not (one_class or at_chance):
        return None
    what = f"the outer SNN's labels of the {len(y)} unlabeled images are"
    if one_class:
        what += f" one class ({top}) for {100 * share:.1f} % of them, and"
    what += f" {pct(right)} right"
    if at_chance:
        what += f", chance level (1/{data['classes']})"
    return (
        f"trusted subset: {what}; DEC keeps {stats['trusted_size']} of its "
        f"{stats['confident_size']} confident ones for the inner SNN; likely causes: "
        f"{likely_causes(args)}"
    )


# ==== The pipeline ================================================================================
def main(argv=None):
    """The pipeline: data, split, the stages of --method, results.json.

    Under torchrun every process runs it; rank 0 alone holds the lock, reads and writes --out,
    evaluates and reports, and returns the results (the others return None).
    """
    args = argv if isinstance(argv, argparse.Namespace) else get_args(argv)
    setup_device(args)
    args.t0 = time.time()
    if args.bench:
        fetch_dataset(args)
        data = load_dataset(args)
        split = labeled_split(data["train_y"], args.labels, data["classes"], args.seed)
        set_normalisation(args, data)
        place_data(args, data)
        return bench(args, data, split)
    # Rank 0 holds the lock: claim_out keeps it in args.lock, since an open file cannot be
    # broadcast.
    args.lock = None
    on_rank_0(args, claim_out, args)
    warnings = announce_ema(args) if args.rank == 0 else []
    fetch_dataset(args)
    data = load_dataset(args)
    split = on_rank_0(args, prepare_out, args, data)
    set_normalisation(args, data)
    place_data(args, data)
    res = {k: vars(args)[k] for k in ("method", "dataset", "labels", "seed", "arch", "steps")}
    res.update(world_size=args.world_size, batchnorm=batchnorm_kind(args), device=str(args.dev))
    res["versions"] = dict(torch=torch.__version__, torchvision=torchvision.__version__)
    warnings += train_stages(args, data, split, res)
    if args.rank != 0:
        leave_process_group(args)
        return None
    final_stage = dict(fixmatch="outer", kdfixmatch="inner").get(args.method, args.method)
    for k in ("test_acc", "test_acc_median20", "evals"):
        res[k] = res[final_stage][k]
    for stage in STAGES:
        problem = stage_warning(stage, res[stage], data, args) if stage in res else None
        if problem:
            warnings.append(problem)
    res["ema_warmup"] = ema_warmup_record(args)
    res["warnings"] = warnings
    res["wall_s"] = time.time() - args.t0
    res["config"] = vars_of(args)
    # Which path each kernel took (Triton, PyTorch, or PyTorch after a failed self-check).
    res["kernels"] = kernels.provenance()
    save(os.path.join(args.out, "results.json"), res)
    report(res)
    leave_process_group(args)
    return res


def train_stages(args, data, split, res):
    """The SNNs of --method, each stage's summary into res. -> the warnings said meanwhile."""
    warnings = []
    if args.method in ("supervised", "suave"):
        _, res[args.method] = train_snn(args, data, args.method, split)
        return warnings
    if args.outer_from:
        # A finished run's outer SNN.
        outer_pt = os.path.join(args.outer_from, "outer.pt")
        outer, res["outer"] = load_final(args, data, outer_pt, "outer")
    else:
        outer, res["outer"] = train_snn(args, data, "outer", split)
    if args.method == "fixmatch":
        return warnings
    # Under torchrun, rank 0 computes the trusted subset and the others receive it.
    kd = on_rank_0(args, trusted_subset, args, data, outer)
    if args.rank == 0:
        res["trusted"] = kd["stats"]
        log_trusted_curves(args, kd["stats"])
        # Said before the inner SNN trains on it.
        trusted_problem = trusted_warning(kd["stats"], data, args)
        if trusted_problem:
            warnings += warn(trusted_problem)
    _, res["inner"] = train_snn(args, data, "inner", split, trusted=kd["trusted"])
    return warnings


def on_rank_0(args, fn, *fn_args):
    """fn(*fn_args) on rank 0 alone; the other processes wait for its result, or leave as it did.

    Rank 0 alone reads and writes --out. This is how the others get the split and the trusted
    subset, and how rank 0's stop (an error, or a run found complete) ends them too, rather than
    leaving them waiting for it.
    """
    if args.world_size == 1:
        return fn(*fn_args)
    outcome = dict(result=None, exit_status=None)
    if args.rank == 0:
        try:
            outcome["result"] = fn(*fn_args)
        except SystemExit as stop:
            # Rank 0 has said why (die prints before it exits).
            outcome["exit_status"] = stop.code
    # broadcast_object_list replaces the list's items with rank 0's, in place.
    box = [outcome]
    dist.broadcast_object_list(box, src=0)
    outcome = box[0]
    if outcome["exit_status"] is not None:
        dist.destroy_process_group()
        sys.exit(outcome["exit_status"])
    return outcome["result"]


def leave_process_group(args):
    """torchrun: every process waits for rank 0's last write, then leaves the group."""
    if args.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


def setup_device(args):
    """--device and --precision; CPU and cuDNN settings that make the steps faster.

    Under torchrun: this process's GPU (its LOCAL_RANK), and the process group.
    """
    if args.device == "auto":
        args.dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        args.dev = torch.device(args.device)
    cuda = args.dev.type == "cuda"
    if cuda and args.world_size > 1:
        args.dev = torch.device("cuda", args.local_rank)
    if cuda and (args.dev.index or 0) >= torch.cuda.device_count():
        if args.world_size > 1 and torch.cuda.device_count() > 0:
            die(
                f"torchrun: {args.local_world_size} processes on this machine, "
                f"{torch.cuda.device_count()} GPUs here; lower --nproc_per_node"
            )
        die(
            f"--device {args.device}: not here ({torch.cuda.device_count()} GPUs); use --device cpu"
        )
    if args.world_size > 1:
        join_process_group(args)
    args.bf16 = args.precision == "bf16" or (args.precision == "auto" and cuda)
    # On a CPU, confident networks make denormal floats, which are 1.5x slower.
    torch.set_flush_denormal(True)
    # Fixed shapes: cuDNN picks its fastest convolutions once.
    torch.backends.cudnn.benchmark = True
    if not cuda:
        keep_freed_memory()


# Rank 0 alone evaluates and runs DEC while the other processes wait at their next collective
# call: on a large unlabeled set that can take longer than torch.distributed's default timeout.
WAIT_FOR_RANK_0 = datetime.timedelta(hours=2)


def join_process_group(args):
    """torchrun: NCCL between GPUs, gloo between CPU processes; the BatchNorm in use, said once."""
    cuda = args.dev.type == "cuda"
    if args.per_gpu_bn and not cuda:
        die("--per-gpu-bn does nothing without CUDA (BatchNorm is per process there already)")
    if cuda:
        torch.cuda.set_device(args.dev)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=WAIT_FOR_RANK_0)
    if args.rank != 0:
        return
    share = args.batch_size // args.world_size
    what = {
        "sync": "SyncBatchNorm over the global batch",
        "per-gpu": "per GPU (--per-gpu-bn), over each GPU's share",
        "per-process": "per process, over each one's share (SyncBatchNorm needs CUDA)",
    }[batchnorm_kind(args)]
    print(
        f"torchrun: {args.world_size} processes ({args.dev.type}), each takes 1/{args.world_size} "
        f"of every step's batch ({share} of its {args.batch_size} labeled images); "
        f"BatchNorm {what}"
    )


def batchnorm_kind(args):
    """Which BatchNorm a run of several processes has: SyncBatchNorm, or per GPU or process."""
    if args.world_size == 1:
        return None
    if args.dev.type != "cuda":
        return "per-process"
    if args.per_gpu_bn:
        return "per-gpu"
    return "sync"


def keep_freed_memory():
    """glibc: keep freed buffers rather than return them to the system and fault them in again.

    Each step frees and reallocates the same large activations; this saves 11 % of a CPU step.
    """
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallopt"):
        return
    M_TRIM_THRESHOLD = -1
    M_MMAP_THRESHOLD = -3
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


def set_normalisation(args, data):
    """args.mean, args.std: ImageNet's with ImageNet weights, else the training images' own."""
    if args.pretrained or args.weights:
        mean = torch.tensor([0.485, 0.456, 0.406])
        std = torch.tensor([0.229, 0.224, 0.225])
    else:
        # A strided sample of at most about 10,000 images.
        train_x = data["train_x"]
        x = train_x[:: max(1, len(train_x) // 10000)].float() / 255
        mean = x.mean((0, 2, 3))
        # A constant channel (std 0) would divide by zero.
        std = x.std((0, 2, 3)).clamp_min(1 / 255)
    args.mean = mean.view(1, -1, 1, 1).to(args.dev)
    args.std = std.view(1, -1, 1, 1).to(args.dev)


def place_data(args, data):
    """Images in GPU memory when they take under a quarter of it, else in pinned host memory."""
    cuda = args.dev.type == "cuda"
    for k, x in (("x", data["train_x"]), ("test_x", data["test_x"])):
        on_gpu = cuda and x.numel() < torch.cuda.mem_get_info(args.dev)[0] // 4
        if on_gpu:
            data[k] = x.to(args.dev)
        elif cuda:
            data[k] = x.pin_memory()
        else:
            data[k] = x
        if cuda and args.rank == 0:
            where = "GPU" if on_gpu else "pinned host"
            print(f"{k}: {x.numel() >> 20} MiB in {where} memory")
    data["y"] = data["train_y"].to(args.dev)


def pct(v):
    return "-" if v is None else f"{100 * v:.2f}%"


def report(res):
    """Each stage's final EMA test accuracy (and median of the last 20), then the trusted subset."""
    print(
        f"\n{res['method']} on {res['dataset']} ({res['labels']} labels, {res['arch']}, "
        f"{res['steps']} steps/SNN, seed {res['seed']}), wall time {res['wall_s']:.0f} s:"
    )
    names = (
        ("supervised", "supervised floor"),
        ("outer", "FixMatch (outer SNN)"),
        ("inner", "KD-FixMatch (inner SNN)"),
        ("suave", "Suave"),
    )
    for stage, name in names:
        r = res.get(stage)
        if not r:
            continue
        print(
            f"  {name:24s} test acc {pct(r['test_acc'])}, median of last 20 "
            f"{pct(r['test_acc_median20'])} ({r['evals']} evals), {r['images_per_s']:.0f} img/s"
        )
    t = res.get("trusted")
    if t:
        print(
            f"  outer pseudo labels, all {t['unlabeled']} unlabeled: precision "
            f"{pct(t['outer_pseudo_label_precision'])}"
        )
        print(
            f"  confident (>= tau_select): {t['confident_size']}, "
            f"precision {pct(t['confident_precision'])}"
        )
        print(
            f"  trusted subset (after DEC): {t['trusted_size']}, "
            f"precision {pct(t['trusted_precision'])}"
        )
    for warning in res.get("warnings", []):
        print(f"  warning: {warning}")


# ==== The run's machinery: output directory, lock, records, checkpoints, resume, NaN stop ========
# A run directory holds config.json (the flags), split.json (the labeled indices and what they
# index), metrics.jsonl (a row per evaluation), ckpt_<stage>.pt while a stage trains,
# <stage>.pt when it is done, trusted.pt, and results.json at the end. Every write is atomic.
def save(path, obj):
    """Atomic write (a temporary file, then a rename) of a .pt, JSON lines (a list), bytes or JSON.

    JSON is strict: a NaN is an error, not a number. Nothing planted in --out redirects the
    write: the temporary file is created afresh (a symbolic link at its name is removed, not
    followed; O_EXCL and O_NOFOLLOW refuse one planted after that), and the rename replaces a
    link at `path` itself, not its target.
    """
    tmp = path + ".tmp"
    try:
        payload = serialize(path, obj)
        if os.path.lexists(tmp):
            os.remove(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
        try:
            write_all(fd, payload)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except (OSError, ValueError) as e:
        # A full disk, or a NaN, which JSON cannot hold.
        if os.path.lexists(tmp):
            os.remove(tmp)
        die(f"cannot write {path} ({getattr(e, 'strerror', None) or e})")


def serialize(path, obj):
    """The bytes that save() writes."""
    if isinstance(obj, bytes):
        return obj
    if path.endswith(".pt"):
        # In memory first: torch.save's own writes would hide a full disk.
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        return buffer.getbuffer()
    if isinstance(obj, list):
        text = "".join(json.dumps(row, allow_nan=False) + "\n" for row in obj)
    else:
        text = json.dumps(obj, indent=2, allow_nan=False)
    return text.encode()


def write_all(fd, payload):
    """os.write until all of payload is written (one call may write part of it)."""
    view = memoryview(payload)
    while len(view):
        view = view[os.write(fd, view) :]


def read_checkpoint(path, fix=REDO, use=None):
    """torch.load(path) on the CPU, then use(it); corrupt, cut short or foreign: one line.

    weights_only=True: a file can hold tensors, numbers, strings, lists and dicts, never code, so
    a .pt planted in a run directory cannot run anything when it is loaded.
    """
    try:
        obj = torch.load(path, "cpu", weights_only=True)
        if use is not None:
            obj = use(obj)
        return obj
    except Exception as e:
        reason = getattr(e, "strerror", None) or type(e).__name__
        die(f"cannot load {path} ({reason}); {fix}")


def read_metrics(args):
    """metrics.jsonl's rows, each checked; a last line cut short by a power loss is dropped."""
    path = os.path.join(args.out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        die(f"cannot load {path} ({getattr(e, 'strerror', None) or type(e).__name__}); restore it")
    # Each row ends with its newline: what follows the last one is a row cut short.
    lines = text.split("\n")[:-1]
    return [metrics_line(path, number, line) for number, line in enumerate(lines, 1)]


def metrics_line(path, number, line):
    """One row of metrics.jsonl as this program writes it, or one line naming the line."""
    try:
        row = json.loads(line)
    except ValueError:
        row = None
    problem = None
    if not isinstance(row, dict):
        problem = "not a JSON object (cut short or edited)"
    elif not isinstance(row.get("stage"), str):
        problem = "no stage"
    elif type(row.get("step")) is not int:
        problem = "no step (an integer)"
    elif type(row.get("wall_s", 0.0)) not in (int, float):
        problem = "wall_s is not a number"
    if problem:
        die(f"{path} line {number}: {problem}; remove that line, or restore the file")
    return row


def write_metrics(args, rows):
    save(os.path.join(args.out, "metrics.jsonl"), rows)


def log_metrics(args, row):
    """A row per evaluation, with the wall time of all of the run's pieces so far."""
    rows = read_metrics(args)
    write_metrics(args, rows + [dict(row, wall_s=round(time.time() - args.t0, 1))])


def trim_metrics(args, stage, step):
    """A stage restarting at `step` drops its later rows."""
    rows = read_metrics(args)
    write_metrics(args, [r for r in rows if r["stage"] != stage or r["step"] <= step])


def save_checkpoint(path, model, ema, opt, sched, st, args, rngs=None):
    """The training state; rngs: every process's random states (random_states), by rank."""
    if rngs is None:
        rngs = random_states(args)
    state = dict(
        model=model.state_dict(),
        ema=ema.state_dict(),
        opt=opt.state_dict(),
        sched=sched.state_dict(),
        st=st,
        rng=[r["cpu"] for r in rngs],
        cuda_rng=[r["cuda"] for r in rngs] if args.dev.type == "cuda" else None,
    )
    save(path, state)


def random_states(args):
    """This process's random states (the CPU's, its GPU's); under torchrun every process's.

    -> a list by rank. Every process calls it at the same step (a collective under torchrun).
    """
    cuda_state = None
    if args.dev.type == "cuda":
        cuda_state = torch.cuda.get_rng_state(args.dev)
    mine = dict(cpu=torch.get_rng_state(), cuda=cuda_state)
    if args.world_size == 1:
        return [mine]
    every = [None] * args.world_size
    dist.all_gather_object(every, mine)
    return every


# What save_checkpoint writes, and the training state `st` inside it.
CHECKPOINT_PARTS = {"model", "ema", "opt", "sched", "st", "rng", "cuda_rng"}
STATE_FIELDS = {"step": int, "evals": list, "train_s": (int, float), "pl_hit": int, "pl_n": int}


def restore(path, model, ema, opt, sched, args):
    """A checkpoint, with lr, momentum and wd from the flags (they may change after a NaN stop).

    A file that loads but is not this run's checkpoint is one line naming the file and the part.
    """
    c = read_checkpoint(path)
    fix = "remove it and --resume to train that stage from its start"
    if not isinstance(c, dict) or c.keys() != CHECKPOINT_PARTS:
        found = sorted(c) if isinstance(c, dict) else type(c).__name__
        die(f"{path}: not a checkpoint of this program (it holds {found}); {fix}")
    st = c["st"]
    for name, kind in STATE_FIELDS.items():
        if not isinstance(st, dict) or not isinstance(st.get(name), kind):
            die(f"{path} part st: no {name} of the training state; {fix}")
    if not 0 <= st["step"] <= args.steps:
        die(f"{path} part st: step {st['step']} is not in 0..{args.steps} (--steps); {fix}")
    for name, part in (("model", model), ("ema", ema), ("opt", opt), ("sched", sched)):
        try:
            part.load_state_dict(c[name])
        except Exception as e:
            die(f"{path} part {name} does not fit this run ({type(e).__name__}); {fix}")
    # The random state too, so that the resumed run draws what the uninterrupted one would.
    rng = c["rng"]
    cuda_rng = c["cuda_rng"]
    if isinstance(rng, torch.Tensor):
        # A checkpoint from before random states were kept by rank: rank 0's CPU state, and the
        # state of every GPU, which every process then took.
        rng = [rng] * args.world_size
        if cuda_rng:
            cuda_rng = [cuda_rng[args.dev.index or 0]] * args.world_size
    try:
        torch.set_rng_state(rng[args.rank])
        if cuda_rng and args.dev.type == "cuda":
            torch.cuda.set_rng_state(cuda_rng[args.rank], args.dev)
    except Exception as e:
        die(f"{path} part rng is not a random state ({type(e).__name__}); {fix}")
    # After a NaN stop the flags may differ from the checkpoint's: they apply from the next step
    # on, its learning rate included (the schedule would otherwise apply a new --lr one step late).
    lr_now = args.lr * lr_factor(st["step"], args.steps)
    for group, wd in zip(opt.param_groups, (args.wd, 0.0)):
        group.update(lr=lr_now, initial_lr=args.lr, momentum=args.momentum, weight_decay=wd)
        group["nesterov"] = args.momentum > 0
    sched.base_lrs = [args.lr] * len(opt.param_groups)
    return c["st"]


def load_final(args, data, path, stage):
    """A finished stage: its EMA model and summary."""
    ema = snn_model(args, data, suave=stage == "suave", imagenet=False).eval()

    def use(c):
        ema.load_state_dict(c["ema"])
        summary = c["summary"]
        # The fields that main and report read; another file's summary lacks them.
        missing = {"test_acc", "test_acc_median20", "evals", "images_per_s"} - summary.keys()
        if missing:
            raise KeyError(sorted(missing))
        return summary

    return ema, read_checkpoint(path, use=use)


def read_trusted(path, data):
    """trusted.pt, checked: an outer label (or -1) for each unlabeled image, and its statistics."""
    c = read_checkpoint(path)
    fix = "remove it and --resume to redo the trusted subset"
    if not isinstance(c, dict) or c.keys() != {"trusted", "stats"}:
        found = sorted(c) if isinstance(c, dict) else type(c).__name__
        die(f"{path}: not a trusted subset of this program (it holds {found}); {fix}")
    y, classes, trusted = data["train_y"], data["classes"], c["trusted"]
    fits = isinstance(trusted, torch.Tensor) and trusted.dtype == y.dtype
    fits = fits and trusted.shape == y.shape
    if not fits or not ((trusted >= -1) & (trusted < classes)).all():
        die(
            f"{path} field trusted: not a label in -1..{classes - 1} for each of the {len(y)} "
            f"unlabeled images; {fix}"
        )
    if not isinstance(c["stats"], dict):
        die(f"{path} field stats: not a dict; {fix}")
    return c


def stop_if_diverged(args, stage, w, acc, norms, done, bar):
    """The NaN stop: a non-finite loss, weight, BatchNorm statistic or accuracy ends the run.

    It exits with status 1 and says how to resume from the last checkpoint with other flags.
    """
    checked = torch.cat(
        [w[:, 0].double(), norms.double(), torch.tensor([acc], dtype=torch.float64)]
    )
    finite = checked.isfinite()
    if finite.all():
        return
    # The first non-finite step loss; weights and accuracy count as the window's last step.
    first_bad = min(int((~finite).nonzero()[0, 0]), len(w) - 1)
    bad_step = done - len(w) + first_bad + 1
    if args.rank == 0:
        save(os.path.join(args.out, "diverged.json"), dict(stage=stage, step=bad_step))
    bar.close()
    # Checkpoints are written at evaluations.
    ckpt_step = (done - len(w)) // args.eval_every * args.eval_every
    if ckpt_step:
        at = f"at its checkpoint of step {ckpt_step}"
    else:
        at = "before a checkpoint"
    # The flags that can make the step finite again: the step's size, and for FixMatch the weight
    # of its unlabeled term. Not the EMA (an average of finite weights is finite), nor Sinkhorn's
    # epsilon (its targets are floored, so Suave's loss is bounded while the weights are finite).
    fix = "--lambda-u, --wd, " if stage in ("outer", "inner") else "--wd, "
    fp32 = ", --precision fp32" if args.bf16 else ""
    stop_together(
        args,
        f"{stage} SNN: non-finite loss or weights at step {bad_step}; stopped {at}. Resume with a "
        f"lower --lr (or {fix}--momentum{fp32}): {this_command(args)} "
        f"--out {shlex.quote(args.out)} --resume --lr ...",
        status=1,
    )


def stop_together(args, msg, status):
    """A stop that every process meets at the same step: one message, then all leave.

    Rank 0 says why; the others wait until it has, since torchrun stops the rest as soon as one
    process leaves.
    """
    if args.rank == 0:
        say_error(msg)
    if args.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    sys.exit(status)


def claim_out(args):
    """--out for this process alone (args.lock), and what it holds, decided under its lock.

    The checks come after the lock, so that no other run can finish or start in between: a
    finished run is never rewritten, and a new start never replaces a run.
    """
    os.makedirs(args.out, exist_ok=True)
    lock = open_lock(args.out)
    try:
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        die(f"--out {args.out} is in use by process {lock.read()}; wait or stop it")
    if args.resume and os.path.exists(os.path.join(args.out, "results.json")):
        print(f"kdfixmatch.py: {args.out} is complete (results.json); nothing to resume")
        sys.exit(0)
    if not args.resume:
        for f in sorted(os.listdir(args.out)):
            if f.endswith(".pt") or f == "results.json":
                die(
                    f"--out {args.out} already holds a run ({f}); "
                    "pass --resume or choose another --out"
                )
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    # Held (open) until the process exits.
    args.lock = lock


def open_lock(out):
    """out/.lock, never through a symbolic link planted there (O_NOFOLLOW)."""
    path = os.path.join(out, ".lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        die(f"--out {out}: .lock is a symbolic link; remove it")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        die(f"--out {out}: .lock is not a regular file; remove it")
    return os.fdopen(fd, "r+")


def sha256_of(t):
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def split_record(args, data):
    """What the labeled indices index: the data and the flags that drew them."""
    x, y = data["train_x"], data["train_y"]
    return dict(
        dataset=args.dataset,
        labels=args.labels,
        seed=args.seed,
        arch=args.arch,
        data_dir=os.path.abspath(args.data_dir),
        train_images=len(y),
        train_labels_sha256=sha256_of(y.long()),
        # A strided sample of the pixels: another --image-size or other images differ.
        train_pixels_sha256=sha256_of(x[:: max(1, len(x) // 10000)]),
    )


# split.json's fields and their JSON types (split_record's, and the labeled indices).
SPLIT_FIELDS = dict(
    dataset=str,
    labels=int,
    seed=int,
    arch=str,
    data_dir=str,
    train_images=int,
    train_labels_sha256=str,
    train_pixels_sha256=str,
    labeled=list,
)
TYPE_NAMES = {int: "an integer", str: "a string", list: "a list", bool: "true or false"}


def reuse_split(source, record, other):
    """A persisted split, never redrawn, and never pointed into other data.

    Each field is checked against what split_record wrote, so a hand-edited or damaged file is one
    line naming the field, not a traceback or another split.
    """
    fix = f"restore it, or use {other}"
    recorded = read_json(source, fix)
    if not isinstance(recorded, dict):
        die(f"{source}: not a JSON object; {fix}")
    for k, kind in SPLIT_FIELDS.items():
        if type(recorded.get(k)) is not kind:
            die(f"{source} field {k}: missing, or not {TYPE_NAMES[kind]}; {fix}")
    for k in sorted(set(record) - {"data_dir"}):
        if recorded[k] != record[k]:
            die(
                f"{source} records {k} {recorded[k]} (data {recorded.get('data_dir')}), "
                f"this run {record[k]}; use that data and those flags, or {other}"
            )
    labeled, n = recorded["labeled"], record["train_images"]
    if not all(type(i) is int and 0 <= i < n for i in labeled):
        die(f"{source} field labeled: an index outside 0..{n - 1} (the training images); {fix}")
    if len(set(labeled)) != record["labels"]:
        die(
            f"{source} field labeled: {len(set(labeled))} distinct indices of {len(labeled)}, "
            f"for --labels {record['labels']}; {fix}"
        )
    return torch.tensor(labeled)


def prepare_out(args, data):
    """Persist or reload the labeled split (with what it indexes), config.json and the code."""
    path = os.path.join(args.out, "split.json")
    record = split_record(args, data)
    source = None
    if args.resume:
        source = path
    elif args.outer_from:
        source = os.path.join(args.outer_from, "split.json")
    if source is not None and (source != path or os.path.exists(source)):
        other = "another --out" if source == path else "another --outer-from"
        split = reuse_split(source, record, other)
    else:
        split = labeled_split(data["train_y"], args.labels, data["classes"], args.seed)
    diverged = os.path.join(args.out, "diverged.json")
    if args.resume:
        # The run's wall time counts its earlier pieces.
        args.t0 -= max([r.get("wall_s", 0) for r in read_metrics(args)], default=0)
        if not os.path.exists(diverged):
            return split
    else:
        # A fresh start: no rows of an abandoned one, and the code beside its results.
        save(path, dict(record, labeled=split.tolist()))
        write_metrics(args, [])
        for f in (__file__, kernels.__file__):
            with open(f, "rb") as code:
                save(os.path.join(args.out, os.path.basename(f)), code.read())
    if os.path.exists(diverged):
        # After a NaN stop the flags given now are the run's; the stop's record is kept aside.
        os.replace(diverged, os.path.join(args.out, f"diverged-{int(time.time())}.json"))
    # config.json last: it is what --resume looks for.
    save(os.path.join(args.out, "config.json"), vars_of(args))
    return split


# ==== Benchmark: --bench ==========================================================================
def bench(args, data, split):
    """--bench: images/s of (1) augment, (2) a step on a fixed batch (ceiling), (3) the loop."""
    model, forward, ema, opt, sched = make_model(args, data)
    cuda = args.dev.type == "cuda"
    n = 200 if cuda else 20
    step_images = args.batch_size * (1 + 2 * args.mu)
    # Under torchrun each process times its share of the batch.
    share_images = step_images // args.world_size
    fixed = make_batch(data, split, 0, 0, args)
    # (3) as train_snn runs it: prefetched on a GPU.
    real = batches(data, split, range(2 * n), 0, args)

    def now():
        # Once the GPU's queued work is done.
        if cuda:
            torch.cuda.synchronize()
        return time.time()

    def augment_only(k):
        make_batch(data, split, k, 0, args)

    def step_on_fixed_batch(k):
        train_step(args, forward, ema, opt, sched, "outer", fixed, None, k)

    def step_on_real_batch(k):
        train_step(args, forward, ema, opt, sched, "outer", next(real), None, k)

    rates = []
    for fn in (augment_only, step_on_fixed_batch, step_on_real_batch):
        # A warm-up (and compilation), then n timed calls.
        for k in range(n + n // 4):
            if k == n // 4:
                start = now()
            fn(k)
        rates.append(share_images * n / (now() - start))
    if args.world_size > 1:
        rates = bench_over_processes(args, rates)
    if args.rank != 0:
        leave_process_group(args)
        return None
    # The whole batch's images over the run's images/s: one step's time.
    ms = [f"{r:.0f} ({1000 * step_images / r:.1f} ms)" for r in rates]
    precision_name = "bf16" if args.bf16 else "fp32"
    path = "one launch per view" if kernels.augment_takes(fixed["x_s"]) else "per-op"
    where = str(args.dev)
    if args.world_size > 1:
        where = f"{args.world_size} processes ({args.dev.type}), in all"
    print(
        f"{args.dataset} {args.arch} B={args.batch_size} mu={args.mu} on {where}, "
        f"{precision_name}{' compiled' * args.compile}: images/s of (1) augment ({path}) "
        f"{rates[0]:.0f}, (2) step on a fixed batch {ms[1]}, (3) real loop {ms[2]}; "
        f"(3)/(2) = {rates[2] / rates[1]:.3f}"
    )
    for name, entry in kernels.provenance().items():
        print(f"kernel {name}: {entry['path']} (triton {entry['triton']}, {entry['device']})")
    leave_process_group(args)
    return dict(zip(("augment", "ceiling", "real"), rates))


def bench_over_processes(args, rates):
    """torchrun: every process's three images/s, printed by rank 0. -> their sums."""
    per_rank = [None] * args.world_size
    dist.all_gather_object(per_rank, rates)
    if args.rank != 0:
        return None
    for rank, r in enumerate(per_rank):
        print(
            f"rank {rank}: images/s of (1) augment {r[0]:.0f}, (2) step on a fixed batch "
            f"{r[1]:.0f}, (3) real loop {r[2]:.0f}"
        )
    return [sum(column) for column in zip(*per_rank)]


def another_process_stopped(error):
    """Under torchrun: a collective call failed because another process of the run is gone.

    That process says why (or torchrun's report does, for a kill); this one leaves quietly. Any
    other failure of torch.distributed (an NCCL error, a timeout) is this process's to report.
    """
    if not distributed():
        return False
    gone = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
    return any(sign in str(error) for sign in gone)


if __name__ == "__main__":
    try:
        main(ARGS)
    except KeyboardInterrupt:
        interrupted(ARGS)
    except RuntimeError as e:
        if not another_process_stopped(e):
            raise
        sys.exit(1)
    except OSError as e:
        # For example an --out that cannot be written.
        die(f"cannot write {e.filename or ARGS.out} ({e.strerror or e}); choose another --out")
