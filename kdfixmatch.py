"""KD-FixMatch in one readable script: FixMatch (outer SNN) -> confident + DEC-filtered pseudo labels
-> a fresh FixMatch (inner SNN) that trusts them.

Paper:      KD-FixMatch: Knowledge Distillation Siamese Neural Networks, Wang et al., ICIP 2023,
            arXiv 2309.05826 (no public code; where its text is not available we say "our reading").
Built on:   FixMatch (Sohn et al. 2020), DEC (Xie et al. 2016), symmetric CE (Wang et al. 2019).
Run:        python kdfixmatch.py                          # digits, CPU, about a minute
            python kdfixmatch.py --dataset cifar10 --labels 4000 --arch wrn28_2 --steps 1048576
            python kdfixmatch.py --dataset folder --data-dir cifar10   # any ImageFolder train/ test/
Claim:      the paper reports KD-FixMatch beating FixMatch at 4000 labels by +2.44 (CIFAR10),
            +5.81 (SVHN), +1.99 (CIFAR100), +3.88 (FOOD101) accuracy points. What we measured is in
            README.md, with commands and machines; results.json records every number a run makes.
"""
import argparse, collections, concurrent.futures, copy, ctypes, fcntl, functools, hashlib, io, json
import math, os, re, shlex, shutil, socket, sys, time

def die(msg, status=2):
    """Bad input: one line, exit status 2, no traceback."""
    sys.exit(print(f"kdfixmatch.py: error: {msg}", file=sys.stderr) or status)
def load(path, fix="replace it, or remove it and --resume to redo that stage", then=lambda c: c, **kw):
    """torch.load(path) (.json: json.load), then `then`; corrupt, cut short or foreign: one line."""
    try:
        return then(json.load(open(path)) if path.endswith(".json") else torch.load(path, "cpu", **kw))
    except Exception as e:
        die(f"cannot load {path} ({getattr(e, 'strerror', None) or type(e).__name__}); {fix}")
# ==== Hyper-parameters: every default in one block, with the paper's symbol ====================
FIXMATCH = dict(labels=4000, arch="wrn28_2", steps=2 ** 20, batch_size=64, mu=7, eval_every=1024,
                image_size=None, wd=5e-4, ema_warmup=False, sce_alpha=0.1, sce_beta=1.0)
DATASET_DEFAULTS = {  # the flags a dataset sets: FixMatch's (official code), SCE's CIFAR-10 unless said
    "digits": dict(FIXMATCH, labels=50, arch="small_cnn", steps=500, batch_size=32, mu=5, eval_every=100,
                   ema_warmup=True),                  # ours, for a CPU: the fastest at KD >= 97 %
    **dict.fromkeys(["cifar10", "svhn", "folder"], FIXMATCH),
    "cifar100": dict(FIXMATCH, arch="wrn28_8", wd=1e-3, sce_alpha=6.0, sce_beta=0.1),  # SCE's CIFAR-100
    "food101": dict(FIXMATCH, arch="efficientnet_b0", image_size=128)}   # ours: 75k images in memory
VALID = [  # (flags, is valid, the valid range): every numeric flag, checked before anything runs
    ("labels steps batch_size mu eval_every dec_max_iters dec_batch kmeans_init sinkhorn_iters "
     "suave_hidden suave_dim", lambda v: v >= 1, "a positive integer"),
    ("lr dec_lr suave_temperature sinkhorn_eps", lambda v: v > 0, "> 0"),
    ("wd lambda_u sce_alpha sce_beta workers", lambda v: v >= 0, ">= 0"),
    ("tau tau_select tau_inner dec_tol", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("ema momentum label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("sce_A", lambda v: v < 0, "< 0 (A is log 0)"), ("image_size", lambda v: v >= 8, ">= 8 (pixels)"),
    ("seed", lambda v: 0 <= v < 2 ** 31, "in [0, 2^31)")]
OUTER_RECIPE = ("dataset data_dir labels image_size arch pretrained weights steps batch_size mu tau "
                "lambda_u lr momentum wd ema ema_warmup seed").split()   # --outer-from: from that run
def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--method", default="kdfixmatch", choices=["supervised", "fixmatch", "kdfixmatch", "suave"])
    a("--dataset", default="digits", choices=list(DATASET_DEFAULTS), help="folder: see --data-dir")
    a("--data-dir", default="data", help="torchvision root, or the ImageFolder root with train/ test/")
    a("--labels", type=int, help="labeled examples, class-balanced [digits 50, else 4000]")
    a("--image-size", type=int, help="resize images once at load [native; food101 128]")
    a("--workers", type=int, default=min(8, os.cpu_count() or 1), help="image-folder decoding workers")
    a("--arch", choices=["small_cnn", "wrn28_2", "wrn28_8", "efficientnet_b0"], help="[per dataset]")
    a("--pretrained", action="store_true", help="ImageNet weights for efficientnet_b0 (the paper)")
    a("--weights", help="a local efficientnet_b0 ImageNet state_dict file (offline --pretrained)")
    # FixMatch (Sohn et al. 2020) = the outer SNN, and the inner SNN's recipe
    a("--steps", type=int, help="K, optimizer steps per SNN [paper 2^20; digits 500]")
    a("--batch-size", type=int, help="B, labeled images per step [64; digits 32]")
    a("--mu", type=int, help="mu, unlabeled images per labeled image (FixMatch: 7; digits: 5)")
    a("--tau", type=float, default=0.95, help="tau, pseudo-label confidence threshold (outer SNN)")
    a("--lambda-u", type=float, default=1.0, help="lambda_u, weight of the unlabeled loss")
    a("--lr", type=float, default=0.03, help="eta, SGD learning rate; decays as cos(7 pi k / 16 K)")
    a("--momentum", type=float, default=0.9, help="beta, Nesterov momentum")
    a("--wd", type=float, help="weight decay on conv/linear weights [5e-4; cifar100 1e-3]")
    a("--ema", type=float, default=0.999, help="EMA decay of the weights used to evaluate and label")
    a("--ema-warmup", action=argparse.BooleanOptionalAction, help="min(ema,(1+k)/(10+k)); ours [digits]")
    # KD-FixMatch
    a("--tau-select", type=float, default=0.80, help="tau_select, outer confidence to be a candidate")
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
    # Suave (Fini et al. 2023; defaults from its code)
    a("--suave-temperature", type=float, default=0.1, help="temperature of the cosine scores")
    a("--sinkhorn-eps", type=float, default=0.05, help="Sinkhorn-Knopp epsilon")
    a("--sinkhorn-iters", type=int, default=3, help="Sinkhorn-Knopp iterations")
    a("--label-smoothing", type=float, default=0.01, help="on the labeled term")
    a("--suave-hidden", type=int, default=2048, help="projector hidden units")
    a("--suave-dim", type=int, default=128, help="projector output (prototype) dimension")
    # the run
    a("--seed", type=int, default=0, help="draws the labeled split, init and augmentation")
    a("--eval-every", type=int, help="evaluate the EMA model (and checkpoint) every N steps")
    a("--out", default="runs/latest", help="output dir: metrics.jsonl, results.json, checkpoints")
    a("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    a("--device", default="auto", help="auto, cpu, cuda, cuda:N (data: in GPU memory if it fits)")
    a("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 on CUDA")
    a("--compile", action="store_true", help="torch.compile the model; on a GPU with CUDA graphs")
    a("--bench", action="store_true", help="print images/s of augment, the step, the loop; train none")
    p.error = die                                     # argparse's own errors: one line too
    args = p.parse_args(argv)
    given = {k for k, v in vars(p.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args)))))
             .items() if v is not None}               # the flags on the command line
    if not args.out.strip() or os.path.isfile(args.out):
        die(f"--out {args.out!r} is not a directory; choose another --out")
    cfg, free = os.path.join(args.out, "config.json"), {"out", "resume", "workers", "device",
                                                         "precision", "compile", "data_dir", "bench"}
    if args.resume and not os.path.exists(cfg):
        die(f"--resume: nothing to resume in --out {args.out}; drop --resume to start a new run")
    if args.resume and os.path.exists(os.path.join(args.out, "diverged.json")):   # after a NaN stop
        free |= {"lr", "wd", "momentum", "lambda_u", "ema", "ema_warmup", "sinkhorn_eps", "sce_beta"}
    of = not (args.resume or args.bench) and args.method == "kdfixmatch" and args.outer_from
    src = cfg if args.resume else of and os.path.join(of, "config.json")   # --outer-from: also
    old = load(src, "restore it") if src and os.path.exists(src) else {}   # the outer SNN's recipe
    old = {k: v for k, v in old.items() if not of or k in OUTER_RECIPE}
    for k in sorted(k for k in given & old.keys() - free if old[k] != getattr(args, k)):
        die(f"{'--resume' if args.resume else '--outer-from'}: --{k.replace('_', '-')} "
            f"{getattr(args, k)} differs from {old[k]} in {src}; " + ("resume with the original flags "
            "(or none) or start a new --out" if args.resume else "drop it, or train a new outer SNN"))
    vars(args).update({k: v for k, v in old.items() if k not in given | {"out", "resume"}})
    if args.resume and os.path.exists(os.path.join(args.out, "results.json")):   # exit status 0
        sys.exit(print(f"kdfixmatch.py: {args.out} is complete (results.json); nothing to resume"))
    vars(args).update({k: v for k, v in DATASET_DEFAULTS[args.dataset].items() if vars(args)[k] is None})
    for flags, ok, text in VALID:
        for f, v in ((f, getattr(args, f)) for f in flags.split()):
            if v is not None and not (math.isfinite(v) and ok(v)):
                die(f"--{f.replace('_', '-')} {v}: must be {text}")
    m, M = args.method, "--bench" if args.bench else f"--method {args.method}"
    kd = m == "kdfixmatch" and not args.bench
    for flags, why in (                               # a flag that would do nothing is refused
            ("mu", m == "supervised" and M), ("lambda_u tau", m in ("supervised", "suave") and M),
            ("tau", args.outer_from and "--outer-from"),
            ("tau_select tau_inner loss no_dec outer_from", not kd and M),
            ("dec_tol dec_max_iters dec_lr dec_batch kmeans_init",
             not kd and M or args.no_dec and "--no-dec"),
            ("sce_alpha sce_beta sce_A", not kd and M or args.loss == "ce" and "--loss ce"),
            ("suave_temperature sinkhorn_eps sinkhorn_iters label_smoothing suave_hidden suave_dim",
             m != "suave" and M),
            ("pretrained weights", args.arch != "efficientnet_b0" and f"--arch {args.arch}"),
            ("method steps resume out seed eval_every", args.bench and "--bench (it times FixMatch)")):
        for f in set(flags.split()) & given if why else ():
            die(f"--{f.replace('_', '-')} does nothing with {why}; drop it")
    missing = [s for s in ("train", "test") if not os.path.isdir(os.path.join(args.data_dir, s))]
    if args.outer_from and not os.path.exists(os.path.join(args.outer_from, "outer.pt")):
        die(f"--outer-from {args.outer_from}: no finished outer SNN (outer.pt) there")
    if args.dataset == "folder" and missing:
        die(f"--dataset folder needs --data-dir DIR with DIR/train/<class>/ and DIR/test/<class>/ "
            f"(no {os.path.join(args.data_dir, missing[0])})")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device):
        die(f"--device {args.device}: unknown; use auto, cpu, cuda or cuda:N")
    return args

if __name__ == "__main__": ARGS = get_args()         # flags first: a typo costs no torch import
import numpy as np, PIL.Image, torch, torch.nn as nn, torch.nn.functional as F, torchvision
import torchvision.transforms.v2.functional as TF
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
import sklearn.datasets
from tqdm import tqdm
import kernels
# ==== Data: every set decoded once into a uint8 tensor (N, C, H, W) in memory ==================
def load_dataset(args):
    """-> dict(train_x, train_y, test_x, test_y, classes, flip): uint8 images (N, C, H, W), labels."""
    name, root, size = args.dataset, args.data_dir, args.image_size
    if name == "digits":                              # 1,797 real 8x8 digits; fixed seeded test split
        d = sklearn.datasets.load_digits()
        x = torch.tensor(d.images * (255 / 16)).round().to(torch.uint8)[:, None]
        x, y = TF.resize(x, [size] * 2, antialias=True) if size else x, torch.tensor(d.target)
        te, tr = torch.randperm(1797, generator=torch.Generator().manual_seed(12345)).split([297, 1500])
        return dict(train_x=x[tr], train_y=y[tr], test_x=x[te], test_y=y[te], classes=10, flip=False)
    if name == "folder":
        try:
            splits = [torchvision.datasets.ImageFolder(f"{root}/{s}") for s in ("train", "test")]
        except FileNotFoundError as e:                # no class folder, or one without images
            die(f"--data-dir {root}: {e}")
        c = [ds.classes for ds in splits]
        if c[0] != c[1] or len(c[0]) < 2:
            die(f"--data-dir {root}: train/ and test/ need the same class folders, at least 2 (they"
                f" hold {len(c[0])} and {len(c[1])}; in one only: {sorted(set(c[0]) ^ set(c[1]))})")
    else:
        splits = [_torchvision_split(name, root, train) for train in (True, False)]
    parts = [_to_uint8(ds, args.image_size, args.workers) for ds in splits]   # (x, y)s, or errors
    err = next((p for ps in parts for p in ps if isinstance(p, str)), None)
    sizes = sorted({tuple(p[0].shape[2:]) for ps in parts for p in ps if not isinstance(p, str)})
    if err or len(sizes) > 1:                         # also train/ against test/
        die(f"--data-dir {root}: {err or f'images differ in size {sizes}; pass --image-size N'}")
    (trx, tr_y), (tex, te_y) = [[torch.cat(t) for t in zip(*ps)] for ps in parts]
    return dict(train_x=trx, train_y=tr_y, test_x=tex, test_y=te_y, flip=name != "svhn",  # FixMatch's
                classes=len(getattr(splits[0], "classes", [])) or int(tr_y.max()) + 1)  # choice
def _torchvision_split(name, root, train):
    cls = getattr(torchvision.datasets, {"food101": "Food101"}.get(name, name.upper()))
    kw = dict(train=train) if name.startswith("cifar") else dict(split="train" if train else "test")
    for download in (False, True):                    # not on disk: a download if online
        try:
            return cls(root, download=download, **kw)
        except Exception as e:
            err = socket.setdefaulttimeout(30) or type(e).__name__
    die(f"--dataset {name}: not found in {os.path.abspath(root)} and the download failed ({err}); "
        f"fetch it on a connected machine with torchvision.datasets.{cls.__name__}('{root}', "
        f"download=True) and copy {root}/ here, or pass --data-dir")
def _to_uint8(ds, size, workers):
    """Array-backed sets (CIFAR, SVHN) as they are, file-backed ones decoded in DataLoader workers."""
    if isinstance(getattr(ds, "data", None), np.ndarray):
        x = torch.from_numpy(ds.data)
        x = x if x.shape[1] in (1, 3) else x.permute(0, 3, 1, 2)     # SVHN is NCHW, CIFAR NHWC
        x = torch.cat([TF.resize(c, [size] * 2, antialias=True) for c in x.split(4096)] if size else [x])
        return [(x.contiguous(), torch.tensor(getattr(ds, "targets", None) or ds.labels))]
    ds.loader = functools.partial(_decode, size=size)  # a tensor per batch, not per image (the
    loader = torch.utils.data.DataLoader(ds, 256, num_workers=workers, collate_fn=_stack)
    return list(tqdm(loader, desc="decode", leave=False, disable=None))   # file descriptors)
def _decode(path, size=None):
    """Image file -> uint8 RGB (3, H, W), or why not; 16-bit and float modes scaled."""
    try:
        with PIL.Image.open(path) as im:
            if im.mode == "F" or im.mode.startswith("I"):    # more than 8 bits: scale, not clip
                a, top = np.asarray(im, np.float64), 1 if im.mode == "F" else 65535
                if not 0 <= a.min() <= a.max() <= top:        # NaN fails too
                    return f"{path}: {im.mode} pixels outside [0, {top}]; convert it to 8 bits"
                im = PIL.Image.fromarray(np.rint(a * (255 / top)).astype(np.uint8))
            im = (im.convert("LA") if im.mode == "La" else im).convert("RGB")
            return TF.pil_to_tensor(TF.center_crop(TF.resize(im, size), size) if size else im)
    except Exception as e:                            # corrupt, truncated, empty, not an image
        return f"cannot decode {path} ({type(e).__name__}: {e}); replace or remove it"
def _stack(batch):                # one tensor per batch; a decoding error (a str) goes on as it is
    ims = [im for im, _ in batch]
    bad = [im for im in ims if isinstance(im, str)] or len({im.shape for im in ims}) > 1 and [
        "images differ in size; pass --image-size N"]
    return bad[0] if bad else (torch.stack(ims), torch.tensor([t for _, t in batch]))
def labeled_split(train_y, n_labels, classes, seed):
    """Class-balanced labeled indices drawn by seed (the unlabeled set is all training images)."""
    per_class, rest = divmod(n_labels, classes)
    smallest = int(torch.bincount(train_y, minlength=classes).min())
    if rest or per_class > smallest:
        die(f"--labels {n_labels} is not divisible by the {classes} classes; use a multiple of "
            f"{classes}" if rest else f"--labels {n_labels} asks for {per_class} per class but "
            f"the smallest class has {smallest}; use at most {smallest * classes}")
    g = torch.Generator().manual_seed(seed)
    idx = [torch.nonzero(train_y == c).squeeze(1) for c in range(classes)]
    return torch.cat([i[torch.randperm(len(i), generator=g)[:per_class]] for i in idx]).sort()[0]
# ==== Augmentation (FixMatch), batched: per-sample draws; each op once per slot on its samples ===
RA_OPS = ("identity", "autocontrast", "equalize", "brightness", "color", "contrast", "sharpness",
          "posterize", "solarize", "rotate", "shear_x", "shear_y", "translate_x", "translate_y")
GEOMETRIC = 9                                         # RA_OPS[9:]: one affine resampling per slot
def augment(x, flip=True, strong=False, generator=None):
    """uint8 (N, C, H, W) on any device -> weak (flip, shift) or strong (+ RandAugment, Cutout) views."""
    return apply_plan(x, draw_plan(len(x), *x.shape[-2:], flip, strong, generator))
def draw_plan(N, H, W, flip=True, strong=False, generator=None):
    g, ph, pw = dict(generator=generator), round(0.125 * H), round(0.125 * W)
    plan = dict(flip=(torch.rand(N, **g) < 0.5) & flip,
                dy=torch.randint(-ph, ph + 1, (N,), **g), dx=torch.randint(-pw, pw + 1, (N,), **g))
    if strong:  # FixMatch's RandAugment: 2 ops drawn with replacement, each applied with p = 0.5
        plan.update(op=torch.randint(len(RA_OPS), (N, 2), **g) * (torch.rand(N, 2, **g) < 0.5),
                    level=torch.randint(1, 10, (N, 2), **g),          # magnitude 1..9 of 10
                    sign=torch.randint(2, (N, 2), **g) * 2 - 1,       # of the geometric ops
                    cy=torch.randint(H, (N,), **g), cx=torch.randint(W, (N,), **g))   # Cutout
    return plan
def slot_params(op, level, sign, H, W):
    """One op slot's per-sample parameters, in float64 as torchvision computes them: pt and theta."""
    m = level.double() / 10
    sm, f = m * sign, 0.1 + 1.8 * m                   # official code's enhance span 0.1..1.9
    pick = lambda name, v: torch.where(op == RA_OPS.index(name), v, torch.zeros_like(m))
    rot = torch.deg2rad(pick("rotate", -30 * sm))     # up to 30 degrees (TF.rotate's sign)
    sx, sy = pick("shear_x", torch.atan(0.3 * sm)), pick("shear_y", torch.atan(0.3 * sm))
    tx, ty = (pick("translate_" + a, torch.round(0.3 * sm * n)) for a, n in (("x", W), ("y", H)))
    ox, oy = (pick("shear_x", n / 2) + pick("shear_y", n / 2) for n in (W, H))   # shears pivot on
    a, c = torch.cos(rot - sy) / torch.cos(sy), torch.sin(rot - sy) / torch.cos(sy)
    b, d = -(a * torch.tan(sx) + torch.sin(rot)), torch.cos(rot) - c * torch.tan(sx)
    bits = 8 - (4 * level + 5) // 10                  # posterize 8..4 bits: the paper's table
    return dict(pt=torch.stack([f, 1 - f, (255 << (8 - bits)) & 255, torch.ceil(256 * (1 - m))], 1),
                theta=torch.stack([d, -b, d * (ox - tx) - b * (oy - ty) - ox, -c, a,   # the top-left
                                   a * (oy - ty) - c * (ox - tx) - oy], 1))   # corner (official code)
def apply_plan(x, plan):
    """Apply drawn (or given) per-sample parameters to the uint8 batch x, on x's device."""
    (N, C, H, W), slots, fused = x.shape, range(2 * ("op" in plan)), kernels.augment_takes(x)
    cols = {k: plan[k] for k in ("flip", "dy", "dx", "cy", "cx") if k in plan}
    for j in slots:                                   # per op slot: op, pt (4), theta (6); for
        cols.update({f"op{j}": plan["op"][:, j]}, **{k + str(j): v for k, v in slot_params(
            *(plan[k][:, j] for k in ("op", "level", "sign")), H, W).items()})   # the ops' path:
        if not fused: cols.update({f"order{j}": (o := torch.argsort(plan["op"][:, j], stable=True)),
                                   f"back{j}": torch.argsort(o)})   # sorted by op, and back
    flat = to_device(torch.cat([v.double().view(N, -1) for v in cols.values()], 1).float(), x.device)
    if fused: return kernels.augment(x, flat, bool(slots))   # a GPU: one launch per view, same pixels
    p = dict(zip(cols, flat.split([v.view(N, -1).shape[1] for v in cols.values()], 1)))   # ints exact
    out = flip_translate(x, p["flip"][:, 0] > 0, p["dy"][:, 0].long(), p["dx"][:, 0].long())
    for j in slots:                                   # one slice per op (index_select: 20x out[i])
        e = [0] + torch.bincount(plan["op"][:, j], minlength=len(RA_OPS)).cumsum(0).tolist()
        i = p[f"order{j}"][:, 0].long()
        out, pt, theta = (t.index_select(0, i) for t in (out, p[f"pt{j}"], p[f"theta{j}"]))
        for k, (a, b) in enumerate(zip(e[1:GEOMETRIC], e[2:GEOMETRIC + 1]), 1):
            if b > a: out[a:b] = point_op(RA_OPS[k], out[a:b], *pt.T[:, a:b, None, None, None])
        if N > (g := e[GEOMETRIC]): out[g:] = affine(out[g:], theta[g:])
        out = out.index_select(0, p[f"back{j}"][:, 0].long())    # back in batch order
    if "cy" in p:      # Cutout: half the side, gray, always; clipped at both edges (official)
        iy = torch.arange(H, device=x.device) - p["cy"].long() + H // 4
        ix = torch.arange(W, device=x.device) - p["cx"].long() + W // 4
        box = ((iy >= 0) & (iy < H // 2))[:, None, :, None] & ((ix >= 0) & (ix < W // 2))[:, None, None]
        out = out * ~box + box * torch.tensor(127, dtype=torch.uint8)   # (masked_fill: 9x slower)
    return out
def flip_translate(x, flip, dy, dx):
    """Weak view: flip, then shift (dy, dx) with reflect padding, as one gather (TF.pad + TF.crop)."""
    N, C, H, W = x.shape
    reflect = lambda i, n: torch.where(i >= n, 2 * (n - 1) - i, i.abs())
    ys, xs = (reflect(torch.arange(n, device=x.device) + d[:, None], n) for n, d in ((H, dy), (W, dx)))
    idx = torch.add(torch.where(flip[:, None], W - 1 - xs, xs)[:, None, :], ys[:, :, None], alpha=W)
    return x.reshape(N, C, H * W).gather(2, idx.view(N, 1, H * W).expand(-1, C, -1)).view(N, C, H, W)
def point_op(name, x, f, g, mask, thr):
    """One pixel-value RandAugment op, per-sample parameters (n, 1, 1, 1); equals torchvision's op."""
    if name in ("equalize", "posterize", "solarize") or name == "color" and x.shape[1] == 1:
        return dict(equalize=TF.equalize, color=lambda x: x,   # one channel: as PIL, nothing
                    posterize=lambda x: x & mask.to(torch.uint8),
                    solarize=lambda x: torch.where(x >= thr.to(torch.uint8), 255 - x, x))[name](x)
    xf = x.float()
    fma = lambda a, b, c: (a.double() + b.double() * c.double()).float()   # torchvision's
    if name == "autocontrast":     # add_(b, alpha=c) rounds once. TF.autocontrast without its
        lo, hi = xf.amin((-2, -1), keepdim=True), xf.amax((-2, -1), keepdim=True)   # GPU sync:
        out = (xf - torch.where(hi == lo, 0.0, lo)) / torch.where(hi == lo, 1.0, (hi - lo) * (1 / 255))
    elif name == "sharpness":      # blend with the 3x3-smoothed image (1 1 1, 1 5 1, 1 1 1) / 13,
        i, r = xf[..., 1:-1, 1:-1], xf[..., :-2] + xf[..., 1:-1] + xf[..., 2:]   # border kept
        s = r[..., :-2, :] + r[..., 1:-1, :] + r[..., 2:, :] + 4 * i   # 13 x the smoothed value:
        i.copy_(fma(i, torch.floor((s + 6) / 13) - i, g))   # exact integers, and s / 13 is
        out = xf                   # never a tie, so this is TF's conv2d(...).round()
    elif name == "brightness":     # blend with black
        out = xf * f
    else:                          # blend with the degenerate image: gray, mean gray
        gray = TF.rgb_to_grayscale(x).float() if x.shape[1] == 3 else xf
        out = fma(xf * f, gray if name == "color" else gray.mean((-3, -2, -1), keepdim=True), g)
    return out.clamp(0, 255).to(torch.uint8)
def affine(x, theta):
    """Per-sample affine resampling (nearest, fill 128) by TF.affine's inverse matrices theta (n, 6)."""
    n, C, H, W = x.shape
    t = theta[..., None, None]
    gx = torch.linspace((1.0 - W) * 0.5, (W - 1.0) * 0.5, W, device=x.device)
    gy = torch.linspace((1.0 - H) * 0.5, (H - 1.0) * 0.5, H, device=x.device)[:, None]
    grid = torch.stack([gx * a[:, 0] + gy * a[:, 1] + a[:, 2] for a in
                        (t[:, :3] / (0.5 * W), t[:, 3:] / (0.5 * H))], -1)
    out = F.grid_sample(x.float() - 128, grid, "nearest", "zeros", align_corners=False)
    return (out + 128).to(torch.uint8)    # outside the image: 0 + 128, TF.affine's fill
# ==== Models: nn.Sequential(body -> features, head -> logits); DEC reads body(x) ===============
def build_model(arch, in_ch, classes, pretrained=False, weights=None):
    if arch == "small_cnn":                           # for CPU runs: 4 conv layers, 128 features
        conv = lambda i, o: [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]
        body = nn.Sequential(*conv(in_ch, 32), *conv(32, 32), nn.MaxPool2d(2), *conv(32, 64),
                             *conv(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        return nn.Sequential(collections.OrderedDict(body=body, head=nn.Linear(128, classes)))
    if arch.startswith("wrn28_"): return wrn28(in_ch, classes, width=int(arch[6:]))   # WRN-28-2, -8
    if in_ch != 3: die("--arch efficientnet_b0 needs 3-channel images")
    m, w = torchvision.models.efficientnet_b0(), torchvision.models.EfficientNet_B0_Weights.IMAGENET1K_V1
    if weights: load(weights, "pass torchvision's efficientnet_b0 state_dict", m.load_state_dict)
    elif pretrained:                                  # a download (or torch.hub's cache)
        try: m.load_state_dict(w.get_state_dict(progress=False))
        except Exception as e: die(f"--pretrained: cannot download ({type(e).__name__}); place "
            f"{os.path.basename(w.url)} in {torch.hub.get_dir()}/checkpoints/ or pass --weights FILE")
    body = nn.Sequential(m.features, m.avgpool, nn.Flatten(), nn.Dropout(0.2))
    return nn.Sequential(collections.OrderedDict(body=body, head=nn.Linear(1280, classes)))
class WideBlock(nn.Module):
    """Pre-activation residual block of WRN-28 as FixMatch uses it (BN momentum 0.001, LeakyReLU)."""
    def __init__(self, cin, cout, stride, activate_before_residual=False):
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(cin, momentum=0.001), nn.BatchNorm2d(cout, momentum=0.001)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.short = None if cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)
        self.abr = activate_before_residual       # (FixMatch's first block of the first group)
    def forward(self, x0):                            # as the official TF code's residual()
        x = F.leaky_relu(self.bn1(x0), 0.1)
        x0 = x if self.abr else x0
        y = self.conv2(F.leaky_relu(self.bn2(self.conv1(x)), 0.1))
        return y + (x0 if self.short is None else self.short(x0))
def wrn28(in_ch, classes, width=2):                   # 28 = 6 * 4 + 4 layers
    c = [16, 16 * width, 32 * width, 64 * width]
    blocks = [WideBlock(c[g + (i > 0)], c[g + 1], (1, 2, 2)[g] if i == 0 else 1, g == i == 0)
              for g in range(3) for i in range(4)]
    body = nn.Sequential(nn.Conv2d(in_ch, c[0], 3, 1, 1, bias=False), *blocks, nn.BatchNorm2d(
        c[3], momentum=0.001), nn.LeakyReLU(0.1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = nn.Sequential(collections.OrderedDict(body=body, head=nn.Linear(c[3], classes)))
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
        elif isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight), nn.init.zeros_(m.bias)
    return model
# ==== FixMatch step (Sohn et al. 2020, eq. 2-4) ================================================
def fixmatch_step(model, x_l, y_l, x_w=None, x_s=None, tau=0.95, lambda_u=1.0, trusted=None,
                  loss="ce", alpha=0.1, beta=1.0, A=-4.0):
    """CE(labeled) + lambda_u * masked loss over all mu*B strong rows; trusted: Heuristic 1."""
    B, x = len(x_l), x_l if x_w is None else torch.cat([x_l, x_w, x_s])   # one pass: shared BN
    logits = model(x).float()
    loss_s = F.cross_entropy(logits[:B], y_l)
    if x_w is None: return loss_s, dict(loss_s=loss_s.detach())
    logits_w, logits_s = logits[B:].chunk(2)          # no gradient through the weak view; train_snn
    loss_u, mask, pseudo = kernels.masked_pseudo_label_loss(   # range-checks `trusted` once (a
        logits_w.detach(), logits_s, tau, trusted, loss, alpha, beta, A, check=False)  # GPU sync)
    return loss_s + lambda_u * loss_u, dict(loss_s=loss_s.detach(), loss_u=loss_u.detach(),
                                            mask=mask, pseudo=pseudo)
# ==== KD-FixMatch: high-confidence sampling, then deep embedding clustering (our reading: NOTES.md)
def select_confident(probs, tau_select=0.80):
    """Indices and pseudo labels of the samples whose max softmax probability >= tau_select."""
    conf, labels = probs.max(1)
    idx = torch.nonzero(conf >= tau_select).squeeze(1)
    return idx, labels[idx]
def dec_cluster(z, pseudo, classes, max_iters=2000, lr=0.01, batch=256, tol=1e-3, n_init=20, seed=0):
    """DEC (Xie et al. 2016) on features z: k-means init, SGD on KL(P || Q) until < tol of points move;
    clusters -> classes by Hungarian matching. -> (keep: cluster agrees with pseudo label, info)."""
    z, n, k = z.float(), len(z), classes
    if n < k: return torch.zeros(n, dtype=torch.bool), dict(iters=0, moved=0.0)   # too few for K
    km = KMeans(k, n_init=n_init, random_state=seed).fit(z.cpu().numpy())
    mu = torch.tensor(km.cluster_centers_, dtype=torch.float32, device=z.device, requires_grad=True)
    opt, g = torch.optim.SGD([mu], lr=lr, momentum=0.9), torch.Generator(z.device).manual_seed(seed)
    per_pass, assign, moved, it = max(1, math.ceil(n / batch)), None, 1.0, 0
    for it in range(max_iters):
        if it % per_pass == 0:
            with torch.no_grad():
                q = kernels.dec_soft_assign(z, mu)
                p = q ** 2 / q.sum(0)                 # target: p_ij = (q_ij^2 / f_j), normalised
                p, new = p / p.sum(1, keepdim=True), q.argmax(1)
            moved = 1.0 if assign is None else (new != assign).float().mean().item()
            if moved < tol: break
            assign = new
        i = torch.randint(n, (min(batch, n),), generator=g, device=z.device)
        qb = kernels.dec_soft_assign(z[i], mu)
        kl = (p[i] * (p[i].clamp_min(1e-12).log() - qb.clamp_min(1e-12).log())).sum(1).mean()
        opt.zero_grad(), kl.backward(), opt.step()
    with torch.no_grad(): clusters, pseudo = kernels.dec_soft_assign(z, mu).argmax(1).cpu(), pseudo.cpu()
    table = torch.zeros(k, k, dtype=torch.long).index_put_((clusters, pseudo), torch.tensor(1), True)
    to_class = torch.tensor(linear_sum_assignment(table.numpy(), maximize=True)[1])   # rows: 0..k-1
    it += moved >= tol                                # at the cap: max_iters steps taken
    return to_class[clusters] == pseudo, dict(iters=it, moved=moved, cluster_to_class=to_class.tolist())
def sce_loss(logits, target, alpha=0.1, beta=1.0, A=-4.0):
    """Per-sample symmetric CE (Wang et al. 2019): alpha CE + beta RCE; RCE = -A (1 - p_y), A = log 0."""
    ce = F.cross_entropy(logits, target, reduction="none")
    p_y = logits.softmax(-1).gather(-1, target[:, None]).squeeze(-1)
    return alpha * ce + beta * (-A) * (1 - p_y)
# ==== Suave (Fini et al. 2023): cluster prototypes = class prototypes, one cross-entropy for all
class Prototypes(nn.Linear):
    """Unit prototypes, renormalised in place before each forward (Suave's code); fp32 cosine scores."""
    def forward(self, x):
        with torch.no_grad(): self.weight.copy_(F.normalize(self.weight, dim=1))
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(F.normalize(x.float(), dim=1), self.weight)
def suave_head(in_dim, classes, hidden=2048, dim=128):
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, dim), Prototypes(dim, classes, bias=False))
@torch.no_grad()
def sinkhorn(scores, eps=0.05, iters=3):
    """SwAV's Sinkhorn-Knopp: scores (B, K) -> assignments: rows sum to 1, prototypes equally used."""
    q = torch.exp((scores - scores.max()) / eps).clamp_min(1e-30).T   # K x B; the shift cancels in
    q /= q.sum()                      # the normalising; the floor: no 0 / 0 where a small eps underflows
    K, B = q.shape
    for _ in range(iters):
        q /= K * q.sum(1, keepdim=True)               # each prototype gets mass 1/K
        q /= B * q.sum(0, keepdim=True)               # each sample gets mass 1/B
    return (q * B).T
def suave_step(model, x_l, y_l, x_1, x_2, temperature=0.1, eps=0.05, iters=3, smoothing=0.01):
    """Smoothed CE + swapped Sinkhorn prediction, weighted B/(B+2U), 2U/(B+2U) as Suave's code."""
    B, U = len(x_l), len(x_1)
    scores = model(torch.cat([x_l, x_1, x_2])).float()           # cosine scores in [-1, 1]
    s_l, s_1, s_2 = scores[:B], *scores[B:].chunk(2)
    t_1, t_2 = sinkhorn(s_1.detach(), eps, iters), sinkhorn(s_2.detach(), eps, iters)
    swap = lambda t, s: -(t * (s / temperature).log_softmax(1)).sum(1).mean()
    loss_u = (swap(t_1, s_2) + swap(t_2, s_1)) / 2
    loss_l = F.cross_entropy(s_l / temperature, y_l, label_smoothing=smoothing)
    loss = (B * loss_l + 2 * U * loss_u) / (B + 2 * U)
    return loss, dict(loss_u=loss_u.detach(), mask=torch.ones(U, device=scores.device),
                      pseudo=t_1.argmax(1))
# ==== Training one siamese network (outer, inner, the supervised floor or Suave) ===============
def make_model(args, data, suave=False, imagenet=True):
    """-> model, forward (--compile: compiled), EMA copy, Nesterov SGD, lr * cos(7 pi k / 16 K)."""
    model = build_model(args.arch, data["train_x"].shape[1], data["classes"],
                        imagenet and args.pretrained, args.weights if imagenet else None)
    if suave:                                         # projector + cosine prototypes (Suave)
        model.head = suave_head(model.head.in_features, data["classes"], args.suave_hidden,
                                args.suave_dim)
    model = model.to(args.dev, memory_format=torch.channels_last)
    no_wd = {id(p) for m in model.modules() if isinstance(m, Prototypes) for p in m.parameters()}
    decay = lambda p: p.ndim > 1 and id(p) not in no_wd
    opt = torch.optim.SGD([dict(params=[p for p in model.parameters() if decay(p) == d],
                                weight_decay=args.wd * d) for d in (True, False)],
                          lr=args.lr, momentum=args.momentum, nesterov=args.momentum > 0)
    K, mode = args.steps, "reduce-overhead" if args.dev.type == "cuda" else None
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: math.cos(7 * math.pi * k / (16 * K)))
    fwd = torch.compile(model, mode=mode) if args.compile else model
    return model, fwd, copy.deepcopy(model).eval().requires_grad_(False), opt, sched
def to_device(t, dev):        # a host -> GPU copy from pinned memory does not wait for the GPU
    cuda = dev.type == "cuda" and not t.is_cuda
    return t.pin_memory().to(dev, non_blocking=True) if cuda else t.to(dev)
def to_input(x, args):        # uint8 images -> normalised float on the device, channels_last
    x = (to_device(x, args.dev).float() / 255 - args.mean) / args.std
    return x.contiguous(memory_format=torch.channels_last)
@functools.lru_cache(maxsize=8)                         # drawn once per epoch, not once per batch
def _epoch_perm(n, seed, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
def make_batch(data, split, step, seed, args, unlabeled=True):
    """Batch `step` (B labeled, mu*B unlabeled), augmented; a pure function of (seed, step)."""
    b, g = {}, torch.Generator().manual_seed(seed * 1_000_003 + step)
    for kind, pool, size in (("l", split, args.batch_size),       # unlabeled: every image
                             ("u", None, args.mu * args.batch_size)):
        n, pos = len(data["train_y"]) if pool is None else len(pool), step * size
        s = 2 * seed + (kind == "u")                  # the slices of the epochs the batch spans:
        host = torch.cat([_epoch_perm(n, s, e)[max(0, pos - e * n):pos + size - e * n]
                          for e in range(pos // n, (pos + size - 1) // n + 1)])
        host = host if pool is None else pool[host]
        idx = to_device(host, args.dev)
        x = data["x"][idx] if data["x"].is_cuda else to_device(data["x"][host], args.dev)
        b.update({"x_" + kind: augment(x, data["flip"], False, g), "y_" + kind: data["y"][idx]})
        if kind == "l" and not unlabeled: return b
    return dict(b, x_s=augment(x, data["flip"], True, g), idx_u=idx)    # + the strong views
def batches(data, split, steps, seed, args, unlabeled=True, prefetch=None):
    """make_batch per step; on a GPU the next is built in a thread on a side stream while one trains."""
    if not (args.dev.type == "cuda" if prefetch is None else prefetch):
        yield from (make_batch(data, split, s, seed, args, unlabeled) for s in steps)
        return
    side = torch.cuda.Stream(args.dev) if args.dev.type == "cuda" else None
    def build(step):
        with torch.cuda.stream(side):                 # (no-op for None: the CPU)
            return make_batch(data, split, step, seed, args, unlabeled), side and side.record_event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        nxt = [pool.submit(build, s) for s in steps[:1]]
        for i in range(len(steps)):
            (b, done), nxt = nxt[0].result(), [pool.submit(build, s) for s in steps[i + 1:i + 2]]
            if side:                                  # the step waits for its batch, and the
                torch.cuda.current_stream().wait_event(done)   # allocator for the step
                [t.record_stream(torch.cuda.current_stream()) for t in b.values()]
            yield b
def train_step(args, model, ema, opt, sched, stage, b, trusted, step):
    """One SGD update and the EMA -> (loss, mask rate, right, used) as one tensor, no GPU sync."""
    if args.compile and args.dev.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()    # the last step's graph outputs are done
    x_l, x_w, x_s = [to_input(b[k], args) if k in b else None for k in ("x_l", "x_u", "x_s")]
    with torch.autocast(args.dev.type, torch.bfloat16, enabled=args.bf16):
        if stage == "suave":
            loss, s = suave_step(model, x_l, b["y_l"], x_w, x_s, args.suave_temperature,
                                 args.sinkhorn_eps, args.sinkhorn_iters, args.label_smoothing)
        else:                                         # FixMatch: outer or inner SNN, or the floor
            t = None if trusted is None else trusted[b["idx_u"]]
            loss, s = fixmatch_step(model, x_l, b["y_l"], x_w, x_s, args.tau if t is None else
                                    args.tau_inner, args.lambda_u, t, "ce" if t is None else
                                    args.loss, args.sce_alpha, args.sce_beta, args.sce_A)   # SCE: inner
    opt.zero_grad(set_to_none=True), loss.backward()
    opt.step(), sched.step()
    with torch.no_grad():                             # EMA of the parameters; buffers copied
        d = min(args.ema, (1 + step) / (10 + step)) if args.ema_warmup else args.ema
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - d)
        torch._foreach_copy_(list(ema.buffers()), list(model.buffers()))
        if "mask" not in s: return torch.stack([loss.detach(), *loss.new_zeros(3)])   # the floor
        used = s["mask"] > 0
        return torch.stack([loss.detach(), s["mask"].mean(),
                            (used & (s["pseudo"] == b["y_u"])).sum(), used.sum()]).float()
def train_snn(args, data, stage, split, trusted=None):
    """One SNN (outer, inner given `trusted`, floor or Suave) for K steps; resumes. -> (EMA, summary)."""
    final, ckpt = (os.path.join(args.out, f) for f in (f"{stage}.pt", f"ckpt_{stage}.pt"))
    if os.path.exists(final): return _load_final(args, data, final, stage)
    K, seed = args.steps, args.seed * 1000 + ("outer", "inner", "supervised", "suave").index(stage)
    per_step = args.batch_size * (1 if stage == "supervised" else 1 + 2 * args.mu)   # images
    torch.manual_seed(seed)                           # initial weights; dropout continues from here
    model, fwd, ema, opt, sched = make_model(args, data, stage == "suave")
    st = _restore(ckpt, model, ema, opt, sched, args) if os.path.exists(ckpt) else dict(
        step=0, evals=[], train_s=0.0, pl_hit=0, pl_n=0)
    trim_metrics(args, stage, st["step"])
    trusted = None if trusted is None else kernels.check_trusted(trusted, data["classes"]).to(args.dev)
    bar = tqdm(range(st["step"], K), initial=st["step"], total=K, desc=stage, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30, maxinterval=60)   # a log: a line per 30 s
    window, t0 = [], time.time()
    state = [t for m in (model, ema) for t in m.state_dict().values() if t.is_floating_point()]
    for step, b in zip(bar, batches(data, split, range(st["step"], K), seed, args,
                                    unlabeled=stage != "supervised")):
        window.append(train_step(args, fwd, ema, opt, sched, stage, b, trusted, step))
        done, evaluate_now = step + 1, (step + 1) % args.eval_every == 0 or step + 1 == K
        if done % 32 and not evaluate_now: continue    # the GPU runs ahead: read back every 32
        w, window = torch.stack(window).cpu(), []
        st.update(step=done, train_s=st["train_s"] + time.time() - t0,
                  pl_hit=st["pl_hit"] + int(w[:, 2].sum()), pl_n=st["pl_n"] + int(w[:, 3].sum()))
        acc = evaluate(ema, data["test_x"], data["test_y"], args) if evaluate_now else 0.0
        norms = torch.stack(torch._foreach_norm(state, math.inf)).cpu()   # weights, BN stats: max |x|
        if not (ok := torch.cat([w[:, 0], norms, torch.tensor([acc])]).isfinite()).all():  # no NaN
            bad = done - len(w) + min(int((~ok).nonzero()[0, 0]), len(w) - 1) + 1
            save(os.path.join(args.out, "diverged.json"), dict(stage=stage, step=bad)), bar.close()
            fix = dict(suave="--sinkhorn-eps, ", supervised="").get(stage, "--lambda-u, ") + "--wd, "
            ck = (done - len(w)) // args.eval_every * args.eval_every   # (checkpoints: evaluations)
            at = f"at its checkpoint of step {ck}" if ck else "before a checkpoint"
            die(f"{stage} SNN: non-finite loss or weights at step {bad}; stopped {at}. Resume with a "
                f"lower --lr (or {fix}--momentum, --ema{', --precision fp32' * args.bf16}): python "
                f"kdfixmatch.py --out {shlex.quote(args.out)} --resume --lr ...", status=1)
        row, hit, n = dict(loss=float(w[-1, 0]), lr=sched.get_last_lr()[0]), st["pl_hit"], st["pl_n"]
        if stage != "supervised": row.update(mask=float(w[-1, 1]), pl_precision=hit / n if n else None)
        if evaluate_now:
            st["evals"].append(acc)
            log_metrics(args, dict(stage=stage, step=done, test_acc=st["evals"][-1], **row))
            save(ckpt, dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                            sched=sched.state_dict(), st=st, rng=torch.get_rng_state(), cuda_rng=
                            torch.cuda.get_rng_state_all() if args.dev.type == "cuda" else None))
        bar.set_postfix({k: "-" if v is None else f"{v:.4g}" for k, v in row.items()},
                        test=f"{st['evals'][-1]:.3f}" if st["evals"] else "-", refresh=False)
        t0 = time.time()
    bar.close()
    n = len(st["evals"])                              # FixMatch reports the median of the last 20
    summary = dict(test_acc=st["evals"][-1], evals=n,
                   test_acc_median20=float(np.median(st["evals"][-20:])) if n >= 20 else None,
                   train_s=st["train_s"], images_per_s=K * per_step / max(st["train_s"], 1e-9),
                   pseudo_label_precision=st["pl_hit"] / st["pl_n"] if st["pl_n"] else None)
    save(final, dict(ema=ema.state_dict(), summary=summary, args=vars_of(args)))
    os.remove(ckpt)
    return ema, summary
def evaluate(model, x, y, args, features=False):
    """Accuracy of `model` on uint8 images x; with features=True returns (logits, features)."""
    with torch.no_grad(), torch.autocast(args.dev.type, torch.bfloat16, enabled=args.bf16):
        fs = [model.eval().body(to_input(x[i:i + 1024], args)) for i in range(0, len(x), 1024)]
        logits = torch.cat([model.head(f).float().cpu() for f in fs])
    acc = (logits.argmax(1) == y).float().mean().item() if logits.isfinite().all() else math.nan
    return (logits, torch.cat([f.float().cpu() for f in fs])) if features else acc
def bench(args, data, split):
    """--bench: images/s of (1) augment, (2) a step on a fixed batch (ceiling), (3) the real loop."""
    model, fwd, ema, opt, sched = make_model(args, data)
    n, images = (200 if args.dev.type == "cuda" else 20), args.batch_size * (1 + 2 * args.mu)
    now, rates = lambda: (args.dev.type == "cuda" and torch.cuda.synchronize(), time.time())[1], []
    fixed, real = make_batch(data, split, 0, 0, args), batches(data, split, range(2 * n), 0, args)
    step = lambda k, b: train_step(args, fwd, ema, opt, sched, "outer", b, None, k)
    for fn in (lambda k: make_batch(data, split, k, 0, args), lambda k: step(k, fixed),
               lambda k: step(k, next(real))):       # (3) as train_snn: prefetched
        for k in range(n + n // 4):                   # a warm-up (and compilation), then n steps
            if k == n // 4: t = now()                 # (now: once the GPU's queued work is done)
            fn(k)
        rates.append(images * n / (now() - t))
    ms, prec = [f"{r:.0f} ({1000 * images / r:.1f} ms)" for r in rates], "bf16" if args.bf16 else "fp32"
    fused = kernels.augment_takes(fixed["x_s"])
    print(f"{args.dataset} {args.arch} B={args.batch_size} mu={args.mu} on {args.dev}, {prec}"
          f"{' compiled' * args.compile}: images/s of (1) augment "
          f"({'one launch per view' if fused else 'per-op'}) {rates[0]:.0f}, (2) step on a fixed "
          f"batch {ms[1]}, (3) real loop {ms[2]}; (3)/(2) = {rates[2] / rates[1]:.3f}")
    return dict(zip(("augment", "ceiling", "real"), rates))
# ==== Bookkeeping: atomic writes, checkpoints, metrics, one writer per run directory ===========
def save(path, obj):
    """Atomic write (temp file, rename): .pt, a list as JSON lines, else JSON; strict (no NaN)."""
    tmp, b = path + ".tmp", io.BytesIO()              # a .pt is serialised in memory first:
    try:                                              # torch.save's own writes hide a full disk
        with open(tmp, "wb" if path.endswith(".pt") else "w") as f:
            f.write(torch.save(obj, b) or b.getbuffer() if path.endswith(".pt") else
                    "".join(json.dumps(r, allow_nan=False) + "\n" for r in obj) if isinstance(obj, list)
                    else json.dumps(obj, indent=2, allow_nan=False))
        os.replace(tmp, path)
    except (OSError, ValueError) as e:                # a full disk; a NaN, which JSON cannot hold
        if os.path.lexists(tmp): os.remove(tmp)
        die(f"cannot write {path} ({getattr(e, 'strerror', None) or e})")
def log_metrics(args, row):   # a line per evaluation, with the wall time of all the run's pieces
    _metrics(args, _metrics(args) + [dict(row, wall_s=round(time.time() - args.t0, 1))])
def trim_metrics(args, stage, step):   # a stage restarting at `step` drops its later rows
    _metrics(args, [r for r in _metrics(args) if r["stage"] != stage or r["step"] <= step])
def _metrics(args, rows=None):
    """metrics.jsonl's rows (a last line cut short by a power loss is dropped), or write `rows`."""
    path = os.path.join(args.out, "metrics.jsonl")
    if rows is not None: return save(path, rows)
    text = open(path).read() if os.path.exists(path) else ""
    return [json.loads(line) for line in text.split("\n")[:-1]]
def vars_of(args):
    return {k: v for k, v in vars(args).items() if k not in ("dev", "mean", "std", "bf16", "t0", "lock")}
def _restore(path, model, ema, opt, sched, args):
    """A checkpoint, with lr, momentum and wd from the flags (they may change after a NaN stop)."""
    c = load(path, weights_only=False)
    model.load_state_dict(c["model"]), ema.load_state_dict(c["ema"])
    opt.load_state_dict(c["opt"]), sched.load_state_dict(c["sched"]), torch.set_rng_state(c["rng"])
    if c["cuda_rng"] and args.dev.type == "cuda": torch.cuda.set_rng_state_all(c["cuda_rng"])
    for g, wd in zip(opt.param_groups, (args.wd, 0.0)):
        g.update(initial_lr=args.lr, momentum=args.momentum, weight_decay=wd)
    sched.base_lrs = [args.lr] * len(opt.param_groups)
    return c["st"]
def _load_final(args, data, path, stage):          # a finished stage: its EMA and summary
    ema = make_model(args, data, stage == "suave", False)[2]
    return ema, load(path, then=lambda c: (ema.load_state_dict(c["ema"]), c["summary"])[1])
def claim_out(args):
    """--out for this process alone: no other run in it, no live process holding its lock."""
    for f in [] if args.resume or not os.path.isdir(args.out) else os.listdir(args.out):
        if f.endswith(".pt") or f == "results.json":
            die(f"--out {args.out} already holds a run ({f}); pass --resume or choose another --out")
    os.makedirs(args.out, exist_ok=True)
    lock = open(os.path.join(args.out, ".lock"), "a+")
    try:
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        die(f"--out {args.out} is in use by process {lock.seek(0) or lock.read()}; wait or stop it")
    lock.truncate(0), lock.write(str(os.getpid())), lock.flush()
    return lock
def prepare_out(args, data):
    """Persist or reload the labeled split (with what it indexes), config.json and the code."""
    y, path, x = data["train_y"], os.path.join(args.out, "split.json"), data["train_x"]
    sha = lambda t: hashlib.sha256(t.numpy().tobytes()).hexdigest()
    rec = dict(dataset=args.dataset, labels=args.labels, seed=args.seed, arch=args.arch,
               data_dir=os.path.abspath(args.data_dir), train_images=len(y), train_labels_sha256=
               sha(y.long()), train_pixels_sha256=sha(x[::max(1, len(x) // 10000)]))  # a sample
    f = path if args.resume else args.outer_from and os.path.join(args.outer_from, "split.json")
    other = f"another --{'out' if f == path else 'outer-from'}"
    if f and (f != path or os.path.exists(f)):        # never redraw a persisted split, nor
        s = load(f, f"restore it, or use {other}")   # point its indices into other data
        for k in sorted(k for k in set(s) & set(rec) - {"data_dir"} if s[k] != rec[k]):
            die(f"{f} records {k} {s[k]} (data {s.get('data_dir')}), this run {rec[k]}; "
                f"use that data and those flags, or {other}")
        split = torch.tensor(s["labeled"])
    else:
        split = labeled_split(y, args.labels, data["classes"], args.seed)
    div = os.path.join(args.out, "diverged.json")
    if args.resume:                                   # counts the earlier pieces' wall time
        args.t0 -= max([r.get("wall_s", 0) for r in _metrics(args)], default=0)
        if not os.path.exists(div): return split
    else:                                             # a fresh start: no rows of an abandoned one
        save(path, dict(rec, labeled=split.tolist())), _metrics(args, [])
        for f in (__file__, kernels.__file__):        # the code beside its results
            shutil.copy(f, os.path.join(args.out, os.path.basename(f)))
    if os.path.exists(div):                           # after a NaN stop the flags given now are
        os.replace(div, os.path.join(args.out, f"diverged-{int(time.time())}.json"))   # the run's
    save(os.path.join(args.out, "config.json"), vars_of(args))   # last: what --resume looks for
    return split
# ==== The pipeline =============================================================================
def trusted_subset(args, data, outer):
    """Outer EMA labels the unlabeled set -> select_confident -> dec_cluster. Cached in trusted.pt."""
    path = os.path.join(args.out, "trusted.pt")
    if os.path.exists(path): return load(path, weights_only=False)
    logits, feats = evaluate(outer, data["x"], data["train_y"], args, features=True)
    y, pseudo = data["train_y"], logits.argmax(1)
    idx, labels = select_confident(logits.softmax(1), args.tau_select)
    keep, info = (torch.ones(len(idx), dtype=torch.bool), dict(iters=0)) if args.no_dec else \
        dec_cluster(feats[idx].to(args.dev), labels, data["classes"], args.dec_max_iters,
                    args.dec_lr, args.dec_batch, args.dec_tol, args.kmeans_init, args.seed)
    trusted = torch.full_like(y, -1).index_put_((idx[keep],), labels[keep])
    prec = lambda sel, lab: (lab == y[sel]).float().mean().item() if len(sel) else None
    out = dict(trusted=trusted, stats=dict(
        unlabeled=len(y), outer_pseudo_label_precision=prec(torch.arange(len(y)), pseudo),
        confident_size=len(idx), confident_precision=prec(idx, labels),
        trusted_size=int(keep.sum()), trusted_precision=prec(idx[keep], labels[keep]),
        dec_iters=info["iters"]))
    save(path, out)
    return out
def main(argv=None):
    """The pipeline: data, split, the stages of --method, results.json."""
    args = argv if isinstance(argv, argparse.Namespace) else get_args(argv)
    args.dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                            else "cpu" if args.device == "auto" else args.device)
    if (cuda := args.dev.type == "cuda") and (args.dev.index or 0) >= torch.cuda.device_count():
        die(f"--device {args.device}: not here ({torch.cuda.device_count()} GPUs); use --device cpu")
    args.t0, args.lock = time.time(), None if args.bench else claim_out(args)
    args.bf16 = args.precision == "bf16" or (args.precision == "auto" and cuda)
    torch.set_flush_denormal(True)                    # CPU: confident nets make denormals, 1.5x slower
    torch.backends.cudnn.benchmark = True             # fixed shapes: cuDNN picks its fastest convs
    if not cuda and hasattr(libc := ctypes.CDLL(None), "mallopt"):   # glibc: keep freed buffers,
        libc.mallopt(-3, 1 << 30), libc.mallopt(-1, 1 << 30)   # not refault them: 11 % of a CPU step
    data = load_dataset(args)
    split = (labeled_split(data["train_y"], args.labels, data["classes"], args.seed) if args.bench
             else prepare_out(args, data))
    x = data["train_x"][::max(1, len(data["train_x"]) // 10000)].float() / 255   # a strided sample
    ms = (torch.tensor([[0.485, 0.456, 0.406], [0.229, 0.224, 0.225]]) if args.pretrained or args.weights
          else (x.mean((0, 2, 3)), x.std((0, 2, 3)).clamp_min(1 / 255)))   # ImageNet weights: its
    args.mean, args.std = (v.view(1, -1, 1, 1).to(args.dev) for v in ms)   # statistics; std 0: constant
    for k, x in (("x", data["train_x"]), ("test_x", data["test_x"])):   # on the GPU when they fit
        on_gpu = cuda and x.numel() < torch.cuda.mem_get_info(args.dev)[0] // 4
        data[k] = x.to(args.dev) if on_gpu else x.pin_memory() if cuda else x
        if cuda: print(f"{k}: {x.numel() >> 20} MiB in {'GPU' if on_gpu else 'pinned host'} memory")
    data["y"] = data["train_y"].to(args.dev)
    if args.bench: return bench(args, data, split)
    res = dict({k: vars(args)[k] for k in "method dataset labels seed arch steps".split()}, device=str(
        args.dev), versions=dict(torch=torch.__version__, torchvision=torchvision.__version__))
    if args.method in ("supervised", "suave"):
        _, res[args.method] = train_snn(args, data, args.method, split)
    else:                                             # --outer-from: a finished run's outer SNN
        outer, res["outer"] = (_load_final(args, data, os.path.join(args.outer_from, "outer.pt"),
                               "outer") if args.outer_from else train_snn(args, data, "outer", split))
        if args.method == "kdfixmatch":
            kd = trusted_subset(args, data, outer)
            res["trusted"] = kd["stats"]
            _, res["inner"] = train_snn(args, data, "inner", split, trusted=kd["trusted"])
    final = res[dict(fixmatch="outer", kdfixmatch="inner").get(args.method, args.method)]
    res.update({k: final[k] for k in ("test_acc", "test_acc_median20", "evals")},
               wall_s=time.time() - args.t0, config=vars_of(args))
    save(os.path.join(args.out, "results.json"), res)
    report(res)
    return res
def report(res):
    """Each stage's final EMA test accuracy (median of last 20 if 20), then pseudo-label precision."""
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}%"
    print(f"\n{res['method']} on {res['dataset']} ({res['labels']} labels, {res['arch']}, "
          f"{res['steps']} steps/SNN, seed {res['seed']}), wall time {res['wall_s']:.0f} s:")
    for stage, name in (("supervised", "supervised floor"), ("outer", "FixMatch (outer SNN)"),
                        ("inner", "KD-FixMatch (inner SNN)"), ("suave", "Suave")):
        if r := res.get(stage):                       # (FixMatch reports the median of the last 20)
            print(f"  {name:24s} test acc {pct(r['test_acc'])}, median of last 20 "
                  f"{pct(r['test_acc_median20'])} ({r['evals']} evals), {r['images_per_s']:.0f} img/s")
    if t := res.get("trusted"):
        print(f"  outer pseudo labels, all {t['unlabeled']} unlabeled: precision "
              f"{pct(t['outer_pseudo_label_precision'])}\n  confident (>= tau_select): "
              f"{t['confident_size']}, precision {pct(t['confident_precision'])}\n  trusted subset "
              f"(after DEC): {t['trusted_size']}, precision {pct(t['trusted_precision'])}")

if __name__ == "__main__":
    try:
        main(ARGS)
    except KeyboardInterrupt:                         # one line, and how to go on
        go = ARGS.resume or os.path.exists(c := os.path.join(ARGS.out, "config.json")) and \
            load(c) == vars_of(ARGS)                  # (not another start's)
        print("kdfixmatch.py: interrupted; " + (f"resume with: python {sys.argv[0]} --out "
              f"{shlex.quote(ARGS.out)} --resume" if go else "nothing saved yet"), file=sys.stderr)
        sys.exit(130)
    except OSError as e:                              # e.g. an --out we cannot write
        die(f"cannot write {e.filename or ARGS.out} ({e.strerror or e}); choose another --out")
