"""Fused kernels for kdfixmatch.py's three hot spots, behind plain functions.

    masked_pseudo_label_loss  FixMatch's unlabeled term (+ Heuristic 1 and CE/SCE)
    dec_soft_assign           DEC's Student-t soft assignment (Xie et al. 2016, eq. 1)
    augment                   FixMatch's weak and strong views (flip, shift, RandAugment, Cutout)

The first two dispatch to a Triton kernel for CUDA tensors when triton imports, and to the PyTorch
reference below otherwise (CPU, or KDFM_NO_TRITON=1). augment is the kernel alone: its reference,
and the dispatch, is kdfixmatch.apply_plan, which asks augment_takes whether the kernel serves a
batch. The references define the semantics.

Self-check: the first time a kernel is about to take its Triton path on a device, in a process,
it is compared with its reference on a small input shaped like that call's (self_check). On a
mismatch, or an exception while compiling or running, one line goes to stderr and the kernel takes
the PyTorch path on that device for the rest of the process. provenance() says which path each
kernel took, with the Triton version and the device.

The Triton paths:
    masked_pseudo_label_loss  one launch per call: weak softmax/argmax, Heuristic 1, mask, labels,
                              per-row CE/SCE and d loss/d strong_logits, stored so that backward
                              only scales it by grad_output, in place (Liger-style fused CE)
    dec_soft_assign           forward fuses the distance GEMM (tl.dot, 3xTF32), the Student-t
                              kernel and the row normalisation; backward writes dL/d d2 and the
                              centred, scaled z with one kernel, then one addmm per gradient
    augment                   one launch per view, one program per image (its tile in
                              registers); the reference is kdfixmatch.apply_plan, which calls it
                              for CUDA images of up to 32 x 32 (AUG_MAX_PIXELS)

python kernels.py --bench times both against eager and torch.compile (needs a CUDA device).
"""

import argparse
import functools
import os
import sys
import time
import types

import torch
from tqdm import tqdm

try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except Exception:
    # No triton, or a broken install: the references serve.
    _HAS_TRITON = False

# Triton reads TRITON_INTERPRET when this module's kernels are defined: with it, they run CPU
# tensors in its interpreter (how the tests run them without a GPU).
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


# ==== Dispatch: the Triton path where it serves, self-checked once per kernel and device ==========
def _use_triton(t):
    """Whether t is a tensor the Triton kernels serve: CUDA, triton imports, no KDFM_NO_TRITON=1."""
    return t.is_cuda and _HAS_TRITON and os.environ.get("KDFM_NO_TRITON") != "1"


# (kernel, device) -> the outcome of its self-check: None if it passed, else what differed. A
# kernel's calls on a device take the Triton path when they could and its check passed.
_SELF_CHECKS = {}
# The (kernel, device) pairs called so far, in order (a dict as an ordered set).
_CALLED = {}


def _takes_triton(kernel, device, eligible, inputs):
    """Whether this call of kernel takes its Triton path. eligible: the path's own conditions
    hold (_use_triton and the like). inputs: the call's arguments that self_check takes, read
    only at the first eligible call on the device."""
    key = (kernel, device)
    _CALLED[key] = None
    if not eligible:
        return False
    if key not in _SELF_CHECKS:
        _SELF_CHECKS[key] = _first_use_check(kernel, device, inputs)
    return _SELF_CHECKS[key] is None


def _first_use_check(kernel, device, inputs):
    """The self-check's outcome for a kernel's first Triton call on a device; on a failure, the
    one line that says so, on stderr."""
    # Triton runs CUDA tensors, and CPU tensors in its interpreter. A tensor elsewhere would fail
    # at the launch itself (only a test that forces the path sends one): nothing to compare.
    if device.type != "cuda" and not _INTERPRETED:
        return None
    # While the check runs, this kernel's own calls on the device take the PyTorch path: augment's
    # reference, kdfixmatch.apply_plan, asks augment_takes.
    _SELF_CHECKS[(kernel, device)] = "self-check under way"
    failure = self_check(kernel, *inputs)
    if failure is not None:
        # tqdm.write keeps the line whole under a training run's progress bar.
        tqdm.write(
            f"kernels.py: {kernel} self-check failed on {_device_name(device)} ({failure}); "
            "using the PyTorch path",
            file=sys.stderr,
        )
    return failure


def _device_name(device):
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def provenance():
    """Which path each kernel took in this process, for results.json: {kernel: {"path": "triton",
    "torch" or "torch after a failed self-check: <what differed>", "triton": triton's version or
    None, "device": the device (and its name)}}, for the kernels that ran. A kernel that ran on
    several devices reports the last one its Triton path was considered for (a GPU), else the
    first it ran on."""
    version = triton.__version__ if _HAS_TRITON else None
    report = {}
    for kernel, device in _CALLED:
        considered = (kernel, device) in _SELF_CHECKS
        if kernel in report and not considered:
            continue
        path = "torch"
        if considered:
            failure = _SELF_CHECKS[(kernel, device)]
            path = "triton"
            if failure is not None:
                path = f"torch after a failed self-check: {failure}"
        report[kernel] = dict(path=path, triton=version, device=_device_name(device))
    return report


def reset_provenance():
    """Forget every self-check and call, as in a fresh process (for tests)."""
    _SELF_CHECKS.clear()
    _CALLED.clear()


# ==== Masked pseudo-label loss: reference, input check, dispatch ==================================
def masked_pseudo_label_loss_torch(
    weak_logits, strong_logits, tau, trusted=None, loss="ce", alpha=0.1, beta=1.0, A=-4.0
):
    """The reference: what masked_pseudo_label_loss computes, in the papers' symbols.

    For each of the B unlabeled rows b, with q_b = softmax(weak_logits_b) (the weak view's class
    distribution, no gradient) and p_b = softmax(strong_logits_b) (the strong view's):

        FixMatch mask   m_b = 1(max q_b >= tau), pseudo label argmax q_b     (Sohn et al. 2020)
        Heuristic 1     target y_b = argmax q_b where m_b = 1 (the inner model's own confident
                        label); else trusted_b where trusted_b >= 0 (the trusted outer label);
                        else the row is masked. mask_b = m_b or trusted_b >= 0. Without trusted:
                        y_b = argmax q_b, mask_b = m_b.          (KD-FixMatch; our reading)
        per-row loss    l_b = CE = -log p_b[y_b], or SCE = alpha * CE + beta * RCE with
                        RCE = -A (1 - p_b[y_b]), A = log 0 clipped (-4)   (Wang et al. 2019)
        loss            (1 / B) sum_b mask_b l_b: a mean over all B rows, masked ones included

    Returns (loss, mask float (B,), target (B,) = y_b).
    """
    probs = weak_logits.detach().float().softmax(-1)
    conf, target = probs.max(-1)
    mask = conf >= tau
    if trusted is not None:
        # Heuristic 1: a row the inner model is not confident about takes its trusted outer label.
        outer = ~mask & (trusted >= 0)
        target = torch.where(outer, trusted.to(target.dtype), target)
        mask = mask | outer
    log_p_y = strong_logits.float().log_softmax(-1).gather(-1, target[:, None]).squeeze(-1)
    row_loss = -log_p_y
    if loss == "sce":
        row_loss = alpha * row_loss - beta * A * (1 - log_p_y.exp())
    # where, not a product: a masked row's infinite loss stays out of the mean.
    row_loss = torch.where(mask, row_loss, torch.zeros_like(row_loss))
    return row_loss.mean(), mask.float(), target


def check_trusted(trusted, num_classes):
    """trusted, or ValueError unless every outer label lies in [-1, num_classes). One aminmax and
    one device-to-host copy: on a GPU that is a sync, so a training loop checks its whole trusted
    vector once and then calls masked_pseudo_label_loss(..., check=False)."""
    if trusted.is_floating_point() or trusted.is_complex():
        raise ValueError(f"trusted must be an integer tensor, got {trusted.dtype}")
    if not trusted.numel():
        return trusted
    lo, hi = torch.stack(torch.aminmax(trusted)).tolist()
    if lo < -1:
        bad = lo
    elif hi >= num_classes:
        bad = hi
    else:
        return trusted
    raise ValueError(f"trusted labels must lie in [-1, {num_classes}) (-1 = untrusted), got {bad}")


def masked_pseudo_label_loss(
    weak_logits,
    strong_logits,
    tau,
    trusted=None,
    loss="ce",
    alpha=0.1,
    beta=1.0,
    A=-4.0,
    *,
    check=True,
):
    """FixMatch's unlabeled loss, mean over ALL rows of mask * per-row loss (the formulas:
    masked_pseudo_label_loss_torch).

    weak_logits (B, C) carry no gradient; strong_logits (B, C) do. trusted: int (B,) outer pseudo
    labels, -1 = not trusted (inner SNN only). loss: "ce" or "sce" (alpha, beta, A as in SCE).
    check: validate trusted with check_trusted (ValueError naming a label outside [-1, C)); that
    costs a GPU sync per call, so pass check=False for labels already checked.
    Returns (loss, mask float (B,), pseudo_labels (B,) = the target of each row).
    A weak row with a NaN or +inf logit has a NaN softmax: confidence NaN, label 0 (torch.max's
    first NaN), so it is masked unless trusted.
    """
    if loss not in ("ce", "sce"):
        raise ValueError(f"loss must be 'ce' or 'sce', got {loss!r}")
    if trusted is not None:
        if trusted.shape != strong_logits.shape[:1]:
            raise ValueError(
                f"trusted {tuple(trusted.shape)} must have shape ({strong_logits.shape[0]},)"
            )
        if check:
            check_trusted(trusted, strong_logits.shape[-1])
    args = (weak_logits, strong_logits, tau, trusted, loss, alpha, beta, A)
    check_inputs = (weak_logits, strong_logits, alpha, beta, A)
    eligible = _use_triton(strong_logits)
    if _takes_triton("masked_pseudo_label_loss", strong_logits.device, eligible, check_inputs):
        return _masked_pseudo_label_loss_triton(*args)
    return masked_pseudo_label_loss_torch(*args)


# ==== DEC soft assignment: reference, dispatch ====================================================
def dec_soft_assign_torch(z, centroids, alpha=1.0):
    # |z - mu|^2 = |z|^2 + |mu|^2 - 2 z.mu never materialises N x K x D, but cancels when the
    # features share a large offset. Shifting z and mu by the centroids' mean c leaves every
    # distance unchanged (and every gradient: c is a constant) and keeps the terms small.
    c = centroids.detach().mean(0)
    zc = z - c
    mc = centroids - c
    d2 = (zc * zc).sum(1, keepdim=True) + (mc * mc).sum(1) - 2 * zc @ mc.T
    q = (1 + d2.clamp_min(0) / alpha).pow(-(alpha + 1) / 2)
    return q / q.sum(1, keepdim=True)


def dec_soft_assign(z, centroids, alpha=1.0):
    """q_ij = (1 + |z_i - mu_j|^2 / alpha)^(-(alpha+1)/2), normalised over j. N x K, rows sum to
    1, differentiable with respect to z and centroids."""
    if _takes_triton("dec_soft_assign", z.device, _use_triton(z), (z, centroids, alpha)):
        return _dec_soft_assign_triton(z, centroids, alpha)
    return dec_soft_assign_torch(z, centroids, alpha)


# ==== FixMatch augmentation: the kernel's entry points (the reference is in kdfixmatch.py) ========
# H * W of one image's tile in registers: 32 x 32 (64 x 64 spills).
AUG_MAX_PIXELS = 1024


def augment_takes(x):
    """Whether augment serves the batch x: CUDA images of up to AUG_MAX_PIXELS pixels, on a
    device where the kernel passed its self-check (run here, at the first such batch)."""
    small = x.shape[-2] * x.shape[-1] <= AUG_MAX_PIXELS
    return _takes_triton("augment", x.device, _use_triton(x) and small, (x,))


def augment(x, prm, strong):
    """Weak or strong views of the uint8 batch x (N, C, H, W), C = 1 or 3, from per-sample
    parameter rows prm (N, P) float32, as kdfixmatch.apply_plan lays them out (_plan_rows): flip,
    dy, dx and, for strong views, Cutout's cy, cx, then per op slot: op, f, 1 - f, posterize mask,
    solarize threshold, the affine theta (6). Each image is one program: its ops run in order on a
    tile that stays in registers, so the view costs one launch where apply_plan issues some 200 (a
    CPU cannot issue those as fast as an H100 trains a bf16 WRN-28-2 step). Same arithmetic as
    apply_plan on the CPU, rounded step by step (no fused multiply-add, IEEE division): the same
    pixels. apply_plan calls this once augment_takes said yes; the self-check launches
    _augment_triton itself."""
    return _augment_triton(x, prm, strong)


# ==== Self-check: each Triton path against its reference on a small input =========================
def self_check(kernel, *inputs):
    """None if kernel's Triton path matches its reference on a small input shaped like inputs,
    else a short account of what differed; an exception while compiling or running counts. It is
    small: a few launches (for augment, also apply_plan's ops on 28 images on the CPU) besides
    the compile, which the first call would make anyway; kernels.py --bench prints its time.

        "augment", x                        equal pixels, weak and strong (_check_augment)
        "masked_pseudo_label_loss", weak_logits, strong_logits, alpha, beta, A
                                            float tolerance, value and gradient (_check_loss)
        "dec_soft_assign", z, centroids, alpha
                                            float tolerance, forward and backward (_check_dec)
    """
    check = _CHECKS[kernel]
    try:
        # A first call may come under no_grad (DEC's target update) or autocast: the check runs
        # its own forward and backward, in the dtypes of the call.
        with torch.inference_mode(False), torch.enable_grad():
            with torch.autocast(inputs[0].device.type, enabled=False):
                return check(*inputs)
    except Exception as e:
        return _exception_line(e)


def _exception_line(e):
    # Triton's compile errors start with "at line:col:" and the source; the cause is last.
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    text = lines[0]
    if len(lines) > 1:
        text = f"{lines[0]} ... {lines[-1]}"
    return f"{type(e).__name__}: {text[:200]}"


def _tolerance(dtype):
    """Relative tolerance of a kernel output in dtype against its reference: four roundings in
    dtype, and at least 1e-4 (float32 paths differ in exp, log and the order of their sums)."""
    return max(4 * torch.finfo(dtype).eps, 1e-4)


def _mismatch(what, got, want, tol):
    """None if got lies within tol * (|want| + max |want|) of want everywhere, else an account."""
    got = got.detach().double()
    want = want.detach().double()
    diff = (got - want).abs()
    ok = diff <= tol * (want.abs() + want.abs().max())
    if ok.all():
        return None
    return (
        f"{what}: {int((~ok).sum())} of {ok.numel()} values differ, "
        f"max |difference| {diff.max().item():.2g}"
    )


def _check_loss(weak_logits, strong_logits, alpha, beta, A, rows=16, tau=0.95):
    """The loss kernel against masked_pseudo_label_loss_torch on 16 rows of the call's width and
    dtypes: rows 0-5 confident (the even ones also trusted, with a label that Heuristic 1 must not
    take), trusted rows and masked rows after them. CE without and with trusted labels, SCE with
    them (with an upstream gradient of 0.5, so backward scales); equal masks and targets, the
    loss and d loss / d strong_logits within _tolerance."""
    # A call without classes fails in the kernel's own shape check, after this.
    C = max(1, strong_logits.shape[-1])
    gen = torch.Generator().manual_seed(0)
    weak = 0.5 * torch.randn(rows, C, generator=gen)
    weak[torch.arange(6), torch.arange(6) % C] += 30.0
    strong = 3.0 * torch.randn(rows, C, generator=gen)
    trusted = torch.randint(0, C, (rows,), generator=gen)
    trusted[:6] = (torch.arange(6) + 1) % C
    trusted[1::2] = -1
    device = strong_logits.device
    weak = weak.to(device, weak_logits.dtype)
    strong = strong.to(device, strong_logits.dtype)
    trusted = trusted.to(device)
    cases = [("CE", None, "ce", 1.0), ("CE, trusted labels", trusted, "ce", 1.0)]
    cases.append(("SCE, trusted labels", trusted, "sce", 0.5))
    for name, labels, loss, upstream in cases:
        outs = []
        for fn in (_masked_pseudo_label_loss_triton, masked_pseudo_label_loss_torch):
            s = strong.detach().clone().requires_grad_()
            value, mask, target = fn(weak, s, tau, labels, loss, alpha, beta, A)
            (grad,) = torch.autograd.grad(value, s, torch.tensor(upstream, device=device))
            outs.append((value, mask, target, grad))
        failure = _loss_mismatch(name, *outs, _tolerance(strong.dtype))
        if failure is not None:
            return failure
    return None


def _loss_mismatch(name, got, want, grad_tol):
    """What differs between the (loss, mask, target, gradient) of the kernel and the reference."""
    for what, index in (("mask", 1), ("target", 2)):
        if not torch.equal(got[index], want[index]):
            rows = int((got[index] != want[index]).sum())
            return f"{name}: the {what} differs in {rows} of {len(want[index])} rows"
    failure = _mismatch(f"{name}: loss", got[0], want[0], _tolerance(torch.float32))
    if failure is None:
        failure = _mismatch(f"{name}: d loss / d strong_logits", got[3], want[3], grad_tol)
    return failure


def _check_dec(z, centroids, alpha, points=64):
    """The DEC kernel against dec_soft_assign_torch in float64, on 64 points of the call's width
    D around K centroids, in the call's dtypes and alpha: q and the gradients of <q, g> with
    respect to the points and the centroids, for a random upstream g, within _tolerance."""
    K = max(1, centroids.shape[0])
    D = max(1, centroids.shape[1])
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(K, D, generator=gen)
    x = mu[torch.arange(points) % K] + 0.5 * torch.randn(points, D, generator=gen)
    upstream = torch.randn(points, K, generator=gen)
    device = z.device
    x = x.to(device, z.dtype)
    mu = mu.to(device, centroids.dtype)
    got = _dec_value_and_grads(_dec_soft_assign_triton, x, mu, alpha, upstream)
    want = _dec_value_and_grads(dec_soft_assign_torch, x.double(), mu.double(), alpha, upstream)
    for what, a, b in zip(("q", "d/dz", "d/dcentroids"), got, want):
        failure = _mismatch(what, a, b, _tolerance(a.dtype))
        if failure is not None:
            return failure
    return None


def _dec_value_and_grads(fn, z, centroids, alpha, upstream):
    z = z.detach().clone().requires_grad_()
    centroids = centroids.detach().clone().requires_grad_()
    q = fn(z, centroids, alpha)
    grads = torch.autograd.grad(q, (z, centroids), upstream.to(q))
    return (q, *grads)


def _check_augment(x, images=28):
    """The augmentation kernel against kdfixmatch.apply_plan's own ops on the CPU (tested pixel
    for pixel against torchvision), on 28 random images of x's channels and size: weak views, and
    strong views whose two RandAugment slots each run all 14 ops (levels 1-9, both signs), with
    Cutout at the four corners. Equal pixels."""
    kd = _kdfixmatch()
    C, H, W = x.shape[1:]
    gen = torch.Generator().manual_seed(0)
    cpu = torch.randint(0, 256, (images, C, H, W), dtype=torch.uint8, generator=gen)
    # Image 15 autocontrasts a flat image (hi == lo) and image 16 equalizes a few gray levels.
    cpu[15] = 77
    cpu[16] = cpu[16] // 64 * 50
    for strong in (False, True):
        plan = kd.draw_plan(images, H, W, True, strong, gen)
        if strong:
            every = torch.arange(images)
            plan["op"][:, 0] = every % len(kd.RA_OPS)
            plan["op"][:, 1] = every * 3 % len(kd.RA_OPS)
            plan["level"][:, 0] = every % 9 + 1
            plan["cy"][:4] = torch.tensor([0, H - 1, 0, H - 1])
            plan["cx"][:4] = torch.tensor([0, 0, W - 1, W - 1])
        want = kd.apply_plan(cpu, plan)
        rows = _plan_rows(kd, plan, H, W, strong).to(x.device)
        got = _augment_triton(cpu.to(x.device), rows, strong).cpu()
        if not torch.equal(got, want):
            differ = got != want
            first = int(differ.flatten(1).any(1).nonzero()[0])
            view = "strong" if strong else "weak"
            return (
                f"{view} views: {int(differ.sum())} of {differ.numel()} pixels differ, "
                f"the first in image {first}"
            )
    return None


def _plan_rows(kd, plan, H, W, strong):
    """augment's parameter rows of a plan: kdfixmatch.plan_columns (flip, dy, dx; for strong views
    Cutout's cy, cx, then per slot op, pt and theta), each rounded once to float32."""
    N = len(plan["flip"])
    columns = kd.plan_columns(plan, H, W, sort_order=False)
    return torch.cat([col.double().view(N, -1) for col in columns.values()], 1).float()


def _kdfixmatch():
    """The kdfixmatch module, where augment's reference (apply_plan) lives. It imports this module
    and, run as a script, is __main__: take the copy already loaded rather than load another."""
    for name in ("kdfixmatch", "__main__"):
        module = sys.modules.get(name)
        if hasattr(module, "apply_plan"):
            return module
    import kdfixmatch

    return kdfixmatch


_CHECKS = {
    "augment": _check_augment,
    "masked_pseudo_label_loss": _check_loss,
    "dec_soft_assign": _check_dec,
}


# ==== Triton kernels; every pointer offset is int64 (indices widened before stride products) ======
# Launch configurations. Triton's ahead-of-time compile for sm_90 (test_kernels_compile_for_sm90)
# gives every variant below no register spills.
# Elements per (rows x columns) tile of the row-wise kernels (8 warps).
_TILE = 2048
# Wider loss rows loop over column blocks (online max and sum-exp).
_LOSS_MAX_BLOCK_C = 2048
_DEC_MAX_BLOCK_K = 128
# DEC forward, per centroid tile width: (rows, features per tl.dot step, warps, pipeline stages).
# A 128-wide tile leaves no registers for software pipelining.
_DEC_FWD_TILES = {16: (64, 16, 4, 3), 32: (64, 16, 4, 3), 64: (64, 16, 8, 3), 128: (64, 16, 8, 1)}


def _pl_config(B, C, max_block_c=_LOSS_MAX_BLOCK_C):
    """(rows, columns) of the loss kernel's tile."""
    block_c = min(triton.next_power_of_2(C), max_block_c)
    block_r = max(1, min(_TILE // block_c, 64, triton.next_power_of_2(B)))
    return block_r, block_c


def _dec_block_k(K, max_block_k=_DEC_MAX_BLOCK_K):
    # tl.dot tiles are powers of two >= 16. Up to 128 centroids take one tile, so the forward
    # reads z once: K = 10 pads to 16 (bandwidth-bound there, so the padding moves no bytes) and
    # K = 100 to 128 (22 % of the MMAs; seven 16-wide tiles would pad 12 % but stream z seven
    # times: `--bench` times both). Wider K loops over 128-wide tiles.
    return max(16, min(triton.next_power_of_2(K), max_block_k))


def _dec_bwd_config(K, D):
    """(rows, centroids, features) of the DEC backward kernel's tiles."""
    block_k = min(triton.next_power_of_2(K), 1024)
    block_n = max(1, min(_TILE // block_k, 64))
    block_d = max(16, min(triton.next_power_of_2(D), _TILE // block_n))
    return block_n, block_k, block_d


if _HAS_TRITON:
    # -- Masked pseudo-label loss ------------------------------------------------------------------
    @triton.jit
    def _load_logits(ptr, rows, cols, stride_r, stride_c, C):
        # Padded columns read -inf: they drop out of every max and sum-exp.
        offs = rows[:, None] * stride_r + cols.to(tl.int64)[None, :] * stride_c
        return tl.load(ptr + offs, mask=cols[None, :] < C, other=float("-inf")).to(tl.float32)

    @triton.jit
    def _online_max_sumexp(m, s, x):
        # The running row max m and sum exp(x - m), updated with a (rows x cols) tile x. A row
        # that is all -inf so far keeps m = -inf and shifts by 0, which avoids inf - inf.
        m_new = tl.maximum(m, tl.max(x, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), 1)
        return m_new, s

    @triton.jit
    def _online_argmax(m, arg, x, cols):
        # The first index of the row max (torch.max's tie rule): a later block wins only if larger.
        bm = tl.max(x, 1)
        barg = tl.min(tl.where(x == bm[:, None], cols[None, :], 2147483647), 1)
        return tl.where(bm > m, barg, arg)

    @triton.jit
    def _heuristic_1(
        w_max,
        w_sum,
        w_arg,
        tau,
        trusted_ptr,
        rows,
        st_r,
        HAS_TRUSTED: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        # (mask, target) per row: the confident inner label, else the trusted outer label, else
        # masked. conf = max softmax prob = 1 / sum exp(w - max), divided with round-to-nearest:
        # GPU '/' (div.full) is approximate and could flip conf >= tau within an ulp of tau. exp
        # is the hardware one, as torch's is, so a row whose terms are exact (0 or 1) decides
        # exactly as the reference does.
        conf = tl.math.div_rn(tl.full([BLOCK_R], 1.0, tl.float32), w_sum)
        # A row of -inf is NaN in torch's softmax too.
        conf = tl.where(w_max == float("-inf"), float("nan"), conf)
        keep = conf >= tau
        # A NaN or +inf weak logit makes the sum NaN: conf NaN and label 0, as torch's NaN softmax
        # and first-NaN max give (written out, not left to tl.max: the GPU's skips NaN, the
        # interpreter's propagates it).
        target = tl.where(w_sum != w_sum, 0, w_arg).to(tl.int64)
        if HAS_TRUSTED:
            # Labels were checked on the host (check_trusted): in [-1, C).
            trusted = tl.load(trusted_ptr + rows * st_r).to(tl.int64)
            outer = (keep == 0) & (trusted >= 0)
            target = tl.where(outer, trusted, target)
            keep = keep | outer
        return keep, target

    @triton.jit
    def _pl_row_loss(ce, keep, alpha, beta_A, grad_scale, SCE: tl.constexpr, BLOCK_R: tl.constexpr):
        # (masked per-row loss, coef) with d row_loss / d strong = coef * (softmax - onehot):
        # CE, or SCE = alpha * CE - beta * A * (1 - p_y). where, not a product: a masked inf
        # stays out.
        if SCE:
            p_y = tl.exp(-ce)
            row_loss = alpha * ce - beta_A * (1.0 - p_y)
            coef = alpha - beta_A * p_y
        else:
            row_loss = ce
            coef = tl.full([BLOCK_R], 1.0, tl.float32)
        row_loss = tl.where(keep, row_loss, 0.0)
        coef = tl.where(keep, coef * grad_scale, 0.0)
        return row_loss, coef

    @triton.jit
    def _pl_grad_tile(s, cols, target, s_max, log_sum, coef):
        # coef * (softmax(s) - onehot(target)); coef is 0 on masked rows, where() keeps NaN out.
        # (s - max) - log_sum, not s - lse: exact for huge logits, where lse would round.
        p = tl.exp((s - s_max[:, None]) - log_sum[:, None])
        g = p - tl.where(cols[None, :] == target[:, None], 1.0, 0.0)
        return tl.where(coef[:, None] != 0.0, coef[:, None] * g, 0.0)

    @triton.jit
    def _pl_loss_kernel(
        weak_ptr,
        strong_ptr,
        trusted_ptr,
        grad_ptr,
        row_loss_ptr,
        mask_ptr,
        target_ptr,
        B,
        C,
        sw_r,
        sw_c,
        ss_r,
        ss_c,
        st_r,
        sg_r,
        tau,
        alpha,
        beta_A,
        grad_scale,
        HAS_TRUSTED: tl.constexpr,
        SCE: tl.constexpr,
        WRITE_GRAD: tl.constexpr,
        SINGLE_BLOCK: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < B
        # Tail rows re-read row B - 1 and are never stored.
        rows = tl.minimum(rows, B - 1).to(tl.int64)
        cols = tl.arange(0, BLOCK_C)
        neg_inf = tl.full([BLOCK_R], float("-inf"), tl.float32)
        zero = tl.zeros([BLOCK_R], tl.float32)
        w_arg = tl.zeros([BLOCK_R], tl.int32)

        # Pass 1: weak max, argmax and sum-exp; strong max and sum-exp. When the row fits one
        # tile, each logit is read once and the strong tile s stays for the gradient.
        if SINGLE_BLOCK:
            w = _load_logits(weak_ptr, rows, cols, sw_r, sw_c, C)
            s = _load_logits(strong_ptr, rows, cols, ss_r, ss_c, C)
            w_arg = _online_argmax(neg_inf, w_arg, w, cols)
            w_max, w_sum = _online_max_sumexp(neg_inf, zero, w)
            s_max, s_sum = _online_max_sumexp(neg_inf, zero, s)
        else:
            w_max, w_sum, s_max, s_sum = neg_inf, zero, neg_inf, zero
            for c0 in range(0, C, BLOCK_C):
                w = _load_logits(weak_ptr, rows, c0 + cols, sw_r, sw_c, C)
                s = _load_logits(strong_ptr, rows, c0 + cols, ss_r, ss_c, C)
                w_arg = _online_argmax(w_max, w_arg, w, c0 + cols)
                w_max, w_sum = _online_max_sumexp(w_max, w_sum, w)
                s_max, s_sum = _online_max_sumexp(s_max, s_sum, s)

        keep, target = _heuristic_1(
            w_max, w_sum, w_arg, tau, trusted_ptr, rows, st_r, HAS_TRUSTED, BLOCK_R
        )

        # The per-row loss against the target, from CE = log sum exp(s) - s_y. An all -inf row
        # gives a NaN loss, or 0 if masked.
        s_max = tl.where(s_max == float("-inf"), 0.0, s_max)
        log_sum = tl.log(s_sum)
        if SINGLE_BLOCK:
            s_y = tl.sum(tl.where(cols[None, :] == target[:, None], s, 0.0), 1)
        else:
            s_y = tl.load(strong_ptr + rows * ss_r + target * ss_c).to(tl.float32)
        ce = log_sum - (s_y - s_max)
        row_loss, coef = _pl_row_loss(ce, keep, alpha, beta_A, grad_scale, SCE, BLOCK_R)
        tl.store(row_loss_ptr + rows, row_loss, mask=row_ok)
        tl.store(mask_ptr + rows, keep.to(tl.float32), mask=row_ok)
        tl.store(target_ptr + rows, target, mask=row_ok)

        # Pass 2: d loss / d strong, written in the input dtype.
        if WRITE_GRAD:
            g_rows = grad_ptr + rows[:, None] * sg_r
            if SINGLE_BLOCK:
                g = _pl_grad_tile(s, cols, target, s_max, log_sum, coef)
                tl.store(
                    g_rows + cols[None, :],
                    g.to(grad_ptr.dtype.element_ty),
                    mask=row_ok[:, None] & (cols[None, :] < C),
                )
            else:
                for c0 in range(0, C, BLOCK_C):
                    s = _load_logits(strong_ptr, rows, c0 + cols, ss_r, ss_c, C)
                    g = _pl_grad_tile(s, c0 + cols, target, s_max, log_sum, coef)
                    tl.store(
                        g_rows + (c0 + cols)[None, :],
                        g.to(grad_ptr.dtype.element_ty),
                        mask=row_ok[:, None] & ((c0 + cols)[None, :] < C),
                    )

    @triton.jit
    def _scale_inplace_kernel(x_ptr, scale_ptr, n, BLOCK: tl.constexpr):
        # x *= scale. A scale of exactly 1 (loss.backward()) masks every load and store off: no
        # data moves, and no host sync is needed to find that out. Every lane loads the one value.
        s = tl.load(scale_ptr + tl.zeros([BLOCK], tl.int32)).to(tl.float32)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = (offs < n) & (s != 1.0)
        x = tl.load(x_ptr + offs, mask=ok).to(tl.float32)
        tl.store(x_ptr + offs, (x * s).to(x_ptr.dtype.element_ty), mask=ok)

    # -- DEC soft assignment -----------------------------------------------------------------------

    @triton.jit
    def _dec_kernel_tile(
        z_ptr,
        c_ptr,
        mc_ptr,
        mm_ptr,
        rows,
        ks,
        N,
        K,
        D,
        sz_n,
        sz_d,
        inv_alpha,
        neg_p,
        ALPHA_ONE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # The unnormalised Student-t kernel (1 + d2/alpha)^(-p) of a (rows x centroids) tile,
        # with d2 = |zc|^2 + |mc|^2 - 2 zc.mc on the centred zc = z - c, mc = mu - c (the
        # reference's shift), accumulated over D blocks. tf32x3 (3xTF32) keeps the dot
        # fp32-accurate on tensor cores, and the centring keeps its rounding small against the
        # distances.
        zmu = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        zz = tl.zeros([BLOCK_N], tl.float32)
        ds = tl.arange(0, BLOCK_D).to(tl.int64)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + ds
            c = tl.load(c_ptr + d, mask=d < D, other=0.0)
            zt = tl.load(
                z_ptr + rows[:, None] * sz_n + d[None, :] * sz_d,
                mask=(rows < N)[:, None] & (d < D)[None, :],
                other=0.0,
            )
            zt = zt.to(tl.float32) - c[None, :]
            # A (features x centroids) tile of the centred centroids.
            mt = tl.load(
                mc_ptr + ks[None, :] * D + d[:, None],
                mask=(ks < K)[None, :] & (d < D)[:, None],
                other=0.0,
            )
            zmu = tl.dot(zt, mt, acc=zmu, input_precision="tf32x3")
            zz += tl.sum(zt * zt, 1)
        mm = tl.load(mm_ptr + ks, mask=ks < K, other=0.0)
        # A difference of sums can round below 0: clamp.
        d2 = tl.maximum(zz[:, None] + mm[None, :] - 2.0 * zmu, 0.0)
        base = 1.0 + d2 * inv_alpha
        if ALPHA_ONE:
            u = 1.0 / base
        else:
            u = tl.exp(neg_p * tl.log(base))
        return tl.where((ks < K)[None, :], u, 0.0)

    @triton.jit
    def _dec_fwd_kernel(
        z_ptr,
        c_ptr,
        mc_ptr,
        mm_ptr,
        q_ptr,
        rowsum_ptr,
        N,
        K,
        D,
        sz_n,
        sz_d,
        inv_alpha,
        neg_p,
        ALPHA_ONE: tl.constexpr,
        SINGLE_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        row_ok = rows < N
        kk = tl.arange(0, BLOCK_K).to(tl.int64)
        rowsum = tl.zeros([BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            u = _dec_kernel_tile(
                z_ptr,
                c_ptr,
                mc_ptr,
                mm_ptr,
                rows,
                k0 + kk,
                N,
                K,
                D,
                sz_n,
                sz_d,
                inv_alpha,
                neg_p,
                ALPHA_ONE,
                BLOCK_N,
                BLOCK_K,
                BLOCK_D,
            )
            rowsum += tl.sum(u, 1)
            # All K in one tile: normalise in registers and write q once.
            if SINGLE_K:
                u = u / rowsum[:, None]
            tl.store(
                q_ptr + rows[:, None] * K + (k0 + kk)[None, :],
                u.to(q_ptr.dtype.element_ty),
                mask=row_ok[:, None] & ((k0 + kk) < K)[None, :],
            )
        # K spans several tiles: rescale the unnormalised rows just written, once this
        # program's stores are visible to all its threads.
        if not SINGLE_K:
            tl.debug_barrier()
            for k0 in range(0, K, BLOCK_K):
                offs = rows[:, None] * K + (k0 + kk)[None, :]
                ok = row_ok[:, None] & ((k0 + kk) < K)[None, :]
                u = tl.load(q_ptr + offs, mask=ok, other=0.0).to(tl.float32)
                tl.store(q_ptr + offs, (u / rowsum[:, None]).to(q_ptr.dtype.element_ty), mask=ok)
        tl.store(rowsum_ptr + rows, rowsum, mask=row_ok)

    @triton.jit
    def _dec_bwd_kernel(
        q_ptr,
        g_ptr,
        rowsum_ptr,
        z_ptr,
        c_ptr,
        G_ptr,
        gz_ptr,
        zc_ptr,
        N,
        K,
        D,
        sg_n,
        sg_k,
        sz_n,
        sz_d,
        inv_p,
        coef,
        ALPHA_ONE: tl.constexpr,
        WRITE_GZ: tl.constexpr,
        WRITE_ZC: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # G = dL/d d2 = coef * t * q * (g - sum_k g q), coef = -(alpha+1)/(2 alpha), with
        # t = 1/(1 + d2/alpha) recovered from q: t^p = q * rowsum (rowsum saved by the forward).
        # Then the N x D inputs of the backward's addmm, from one read of z: 2 rowsum(G) zc
        # (dL/dz before "- 2 G mc") and zc itself (for dL/dmu = -2 (G^T zc - colsum(G) mc)).
        rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        row_ok = rows < N
        kk = tl.arange(0, BLOCK_K).to(tl.int64)
        r = tl.zeros([BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ok = row_ok[:, None] & ((k0 + kk) < K)[None, :]
            q = tl.load(q_ptr + rows[:, None] * K + (k0 + kk)[None, :], mask=ok, other=0.0)
            g = tl.load(
                g_ptr + rows[:, None] * sg_n + (k0 + kk)[None, :] * sg_k, mask=ok, other=0.0
            )
            r += tl.sum(q.to(tl.float32) * g.to(tl.float32), 1)
        S = tl.load(rowsum_ptr + rows, mask=row_ok, other=1.0)
        G_rowsum = tl.zeros([BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ok = row_ok[:, None] & ((k0 + kk) < K)[None, :]
            q = tl.load(q_ptr + rows[:, None] * K + (k0 + kk)[None, :], mask=ok, other=0.0).to(
                tl.float32
            )
            g = tl.load(
                g_ptr + rows[:, None] * sg_n + (k0 + kk)[None, :] * sg_k, mask=ok, other=0.0
            ).to(tl.float32)
            t = q * S[:, None]
            # The floor avoids log(0) of a padded or underflowed q, where G is ~0 anyway.
            if not ALPHA_ONE:
                t = tl.exp(tl.log(tl.maximum(t, 1e-30)) * inv_p)
            G = coef * t * q * (g - r[:, None])
            G_rowsum += tl.sum(G, 1)
            tl.store(G_ptr + rows[:, None] * K + (k0 + kk)[None, :], G, mask=ok)
        ds = tl.arange(0, BLOCK_D).to(tl.int64)
        # The backward runs only when one of the two is wanted.
        for d0 in range(0, D, BLOCK_D):
            d = d0 + ds
            ok = row_ok[:, None] & (d < D)[None, :]
            c = tl.load(c_ptr + d, mask=d < D, other=0.0)
            zc = (
                tl.load(z_ptr + rows[:, None] * sz_n + d[None, :] * sz_d, mask=ok, other=0.0).to(
                    tl.float32
                )
                - c[None, :]
            )
            offs = rows[:, None] * D + d[None, :]
            if WRITE_GZ:
                tl.store(gz_ptr + offs, (2.0 * G_rowsum)[:, None] * zc, mask=ok)
            if WRITE_ZC:
                tl.store(zc_ptr + offs, zc, mask=ok)

    # -- FixMatch augmentation: one program per image, its channels x pixels in one tile -----------
    @triton.jit
    def _blend(a, b, g):
        # The reference's fused multiply-add: a + b * g in float64 (g: float32, or a float32
        # value's literal), rounded once to float32.
        return (a.to(tl.float64) + b.to(tl.float64) * g).to(tl.float32)

    @triton.jit
    def _to_u8(v):
        # clamp(0, 255).to(uint8): the fraction is cut off.
        return tl.minimum(tl.maximum(v, 0.0), 255.0).to(tl.int32)

    @triton.jit
    def _nearest(v):
        # grid_sample's nearest pixel: round half to even (v + 0.5 can round in float32).
        fl = tl.floor(v)
        d = v - fl
        up = (d > 0.5) | ((d == 0.5) & (fl.to(tl.int32) % 2 != 0))
        return tl.where(up, fl + 1, fl).to(tl.int32)

    @triton.jit
    def _reread(buf, img, own, src, ok, fill):
        # The tile through this image's output rows: every thread's stores land before any
        # thread reads another's pixel, and every read before the next store.
        tl.store(buf + own, img.to(tl.uint8), mask=own >= 0)
        tl.debug_barrier()
        v = tl.load(buf + src, mask=ok, other=fill).to(tl.int32)
        tl.debug_barrier()
        return v

    @triton.jit
    def _autocontrast(xf, valid):
        # Per channel, [lo, hi] stretched to [0, 255]; a flat channel stays as it is.
        lo = tl.min(tl.where(valid, xf, 255.0), 1)[:, None]
        hi = tl.max(tl.where(valid, xf, 0.0), 1)[:, None]
        shifted = xf - tl.where(hi == lo, 0.0, lo)
        return _to_u8(tl.math.div_rn(shifted, tl.where(hi == lo, 1.0, (hi - lo) * (1 / 255))))

    @triton.jit
    def _equalize(
        img,
        c,
        valid,
        lut_ptr,
        n,
        C: tl.constexpr,
        H: tl.constexpr,
        W: tl.constexpr,
        HWP: tl.constexpr,
    ):
        # Per channel, PIL's lookup table from the histogram: step = (pixels - the count of the
        # top value) // 255, lut = (pixels below + step // 2) // step; a step of 0 keeps the
        # channel. The padding pixels (HWP - H * W of them) count as zeros: taken off bin 0.
        bins = tl.arange(0, 256)
        for k in tl.static_range(C):
            hist = tl.histogram(tl.sum(tl.where((c == k) & valid, img, 0), 0), 256)
            hist = tl.where(bins == 0, hist - (HWP - H * W), hist)
            last = tl.max(tl.where(hist > 0, bins, 0), 0)
            step = (H * W - tl.sum(tl.where(bins == last, hist, 0), 0)) // 255
            lut = (tl.cumsum(hist, 0) - hist + step // 2) // tl.maximum(step, 1)
            lut = tl.where(step == 0, bins, tl.minimum(lut, 255))
            tl.store(lut_ptr + (n * C + k) * 256 + bins, lut.to(tl.uint8))
        tl.debug_barrier()
        img = tl.load(lut_ptr + (n * C + c) * 256 + img, mask=valid).to(tl.int32)
        tl.debug_barrier()
        return img

    @triton.jit
    def _color_or_contrast(
        xf, c, valid, op, f, g, C: tl.constexpr, H: tl.constexpr, W: tl.constexpr
    ):
        # A blend with the gray image (color, op 4) or with its mean (contrast, op 5). The gray
        # is TF.rgb_to_grayscale's: two fused multiply-adds by float32(0.587) and
        # float32(0.114), each exact in float64, then cut to an integer.
        if C == 3:
            r = tl.sum(tl.where(c == 0, xf, 0.0), 0)[None, :] * 0.2989
            r = _blend(r, tl.sum(tl.where(c == 1, xf, 0.0), 0)[None, :], 0.5870000123977661)
            r = _blend(r, tl.sum(tl.where(c == 2, xf, 0.0), 0)[None, :], 0.11400000005960464)
            gray = r.to(tl.int32).to(tl.float32)
        else:
            gray = xf
        mean = tl.sum(tl.sum(tl.where(valid & (c == 0), gray, 0.0), 1), 0)
        gray = tl.where(op == 5, tl.math.div_rn(mean, H * W * 1.0), gray)
        return _to_u8(_blend(xf * f, gray, g))

    @triton.jit
    def _sharpness(img, xf, buf, own, y, x, valid, g, H: tl.constexpr, W: tl.constexpr):
        # A blend with the image smoothed by the 3x3 kernel (1 1 1, 1 5 1, 1 1 1) / 13, exact
        # in integers (13 x the smoothed value, rounded); the border pixels are kept.
        inner = valid & (y >= 1) & (y < H - 1) & (x >= 1) & (x < W - 1)
        s = 4 * img
        tl.store(buf + own, img.to(tl.uint8), mask=valid)
        tl.debug_barrier()
        for d in tl.static_range(9):
            s += tl.load(buf + own + (d // 3 - 1) * W + d % 3 - 1, mask=inner, other=0).to(tl.int32)
        tl.debug_barrier()
        s = ((s + 6) // 13 - img).to(tl.float32)
        return tl.where(inner, _to_u8(_blend(xf, s, g)), img)

    @triton.jit
    def _affine(img, buf, own, c, y, x, valid, q, H: tl.constexpr, W: tl.constexpr):
        # Rotate, shear, translate: the affine grid of kdfixmatch.affine (theta at q + 5..10),
        # then grid_sample's nearest pixel, 128 outside the image.
        gx = x.to(tl.float32) - (W - 1) * 0.5
        gy = y.to(tl.float32) - (H - 1) * 0.5
        u = (
            gx * tl.math.div_rn(tl.load(q + 5), 0.5 * W)
            + gy * tl.math.div_rn(tl.load(q + 6), 0.5 * W)
            + tl.math.div_rn(tl.load(q + 7), 0.5 * W)
        )
        v = (
            gx * tl.math.div_rn(tl.load(q + 8), 0.5 * H)
            + gy * tl.math.div_rn(tl.load(q + 9), 0.5 * H)
            + tl.math.div_rn(tl.load(q + 10), 0.5 * H)
        )
        u = _nearest(((u + 1) * W - 1) * 0.5)
        v = _nearest(((v + 1) * H - 1) * 0.5)
        ok = valid & (u >= 0) & (u < W) & (v >= 0) & (v < H)
        return _reread(buf, img, own, c * (H * W) + v * W + u, ok, 128)

    @triton.jit
    def _rand_augment_op(
        img,
        q,
        c,
        y,
        x,
        valid,
        buf,
        own,
        lut_ptr,
        n,
        C: tl.constexpr,
        H: tl.constexpr,
        W: tl.constexpr,
        HWP: tl.constexpr,
    ):
        # One RandAugment slot, its parameters at q: op (kdfixmatch.RA_OPS' index), f, 1 - f,
        # posterize mask, solarize threshold, theta (6). Op 0 is the identity.
        op = tl.load(q).to(tl.int32)
        f = tl.load(q + 1)
        g = tl.load(q + 2)
        # Color on one channel does nothing, as in PIL.
        if C == 1:
            op = tl.where(op == 4, 0, op)
        xf = img.to(tl.float32)
        if op == 1:
            img = _autocontrast(xf, valid)
        elif op == 2:
            img = _equalize(img, c, valid, lut_ptr, n, C, H, W, HWP)
        elif op == 3:
            # Brightness: a blend with black.
            img = _to_u8(xf * f)
        elif (op == 4) | (op == 5):
            img = _color_or_contrast(xf, c, valid, op, f, g, C, H, W)
        elif op == 6:
            img = _sharpness(img, xf, buf, own, y, x, valid, g, H, W)
        elif op == 7:
            # Posterize: keep the top bits.
            img = img & tl.load(q + 3).to(tl.int32)
        elif op == 8:
            # Solarize: invert from the threshold up.
            img = tl.where(img >= tl.load(q + 4).to(tl.int32), 255 - img, img)
        elif op >= 9:
            img = _affine(img, buf, own, c, y, x, valid, q, H, W)
        return img

    @triton.jit
    def _augment_kernel(
        x_ptr,
        out_ptr,
        lut_ptr,
        prm_ptr,
        P,
        C: tl.constexpr,
        H: tl.constexpr,
        W: tl.constexpr,
        STRONG: tl.constexpr,
        CP: tl.constexpr,
        HWP: tl.constexpr,
    ):
        n = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, CP)[:, None]
        p = tl.arange(0, HWP)[None, :]
        valid = (c < C) & (p < H * W)
        y = p // W
        x = p % W
        buf = out_ptr + n * (C * H * W)
        own = tl.where(valid, c * (H * W) + p, -1)
        row = prm_ptr + n * P
        # Weak view: flip, then shift by (dy, dx) with reflect padding.
        sy = y + tl.load(row + 1).to(tl.int32)
        sx = x + tl.load(row + 2).to(tl.int32)
        sy = tl.where(sy >= H, 2 * (H - 1) - sy, tl.abs(sy))
        sx = tl.where(sx >= W, 2 * (W - 1) - sx, tl.abs(sx))
        sx = tl.where(tl.load(row) > 0, W - 1 - sx, sx)
        src = x_ptr + n * (C * H * W) + c * (H * W) + sy * W + sx
        img = tl.load(src, mask=valid, other=0).to(tl.int32)
        if STRONG:
            # FixMatch's RandAugment: two slots of 11 parameters each, after flip, dy, dx, cy, cx.
            for j in tl.static_range(2):
                q = row + 5 + 11 * j
                img = _rand_augment_op(img, q, c, y, x, valid, buf, own, lut_ptr, n, C, H, W, HWP)
            # Cutout: a gray box of half the side, centred at (cy, cx), clipped at the edges.
            iy = y - tl.load(row + 3).to(tl.int32) + H // 4
            ix = x - tl.load(row + 4).to(tl.int32) + W // 4
            in_box = (iy >= 0) & (iy < H // 2) & (ix >= 0) & (ix < W // 2)
            img = tl.where(in_box, 127, img)
        tl.store(buf + own, img.to(tl.uint8), mask=valid)


# ==== Launches: the Triton paths (autograd wrappers for the loss and DEC) =========================
# The loss's gradient is written by its forward kernel.
class _MaskedPseudoLabelLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weak_logits, strong_logits, tau, trusted, sce, alpha, beta, A, max_block_c):
        B, C = strong_logits.shape
        if weak_logits.shape != (B, C) or C < 1 or B < 1:
            raise ValueError(f"weak {tuple(weak_logits.shape)} and strong {(B, C)} must match")
        dev = strong_logits.device
        block_r, block_c = _pl_config(B, C, max_block_c)
        write_grad = ctx.needs_input_grad[1]
        row_loss = torch.empty(B, dtype=torch.float32, device=dev)
        mask = torch.empty(B, dtype=torch.float32, device=dev)
        target = torch.empty(B, dtype=torch.int64, device=dev)
        # A pointer the kernel does not read (no trusted labels, no gradient) gets any tensor.
        grad = None
        grad_arg = row_loss
        if write_grad:
            grad = torch.empty((B, C), dtype=strong_logits.dtype, device=dev)
            grad_arg = grad
        trusted_arg = target
        trusted_stride = 0
        if trusted is not None:
            trusted_arg = trusted
            trusted_stride = trusted.stride(0)
        _pl_loss_kernel[(triton.cdiv(B, block_r),)](
            weak_logits,
            strong_logits,
            trusted_arg,
            grad_arg,
            row_loss,
            mask,
            target,
            B,
            C,
            weak_logits.stride(0),
            weak_logits.stride(1),
            strong_logits.stride(0),
            strong_logits.stride(1),
            trusted_stride,
            C,
            float(tau),
            float(alpha),
            float(beta) * float(A),
            1.0 / B,
            HAS_TRUSTED=trusted is not None,
            SCE=sce,
            WRITE_GRAD=write_grad,
            SINGLE_BLOCK=block_c >= C,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
            num_warps=8,
        )
        ctx.mark_non_differentiable(mask, target)
        ctx.save_for_backward(grad)
        return row_loss.sum() / B, mask, target

    @staticmethod
    def backward(ctx, grad_loss, _grad_mask, _grad_target):
        # Scaled in place, with no B x C allocation. The saved buffer is spent: a second
        # backward through the same graph fails autograd's version check rather than scaling it
        # twice.
        (grad,) = ctx.saved_tensors
        _scale_inplace_kernel[(triton.cdiv(grad.numel(), 1024),)](
            grad, grad_loss.float(), grad.numel(), BLOCK=1024, num_warps=4
        )
        return None, grad, None, None, None, None, None, None, None


def _masked_pseudo_label_loss_triton(
    weak_logits,
    strong_logits,
    tau,
    trusted=None,
    loss="ce",
    alpha=0.1,
    beta=1.0,
    A=-4.0,
    max_block_c=_LOSS_MAX_BLOCK_C,
):
    """Fused Triton path of masked_pseudo_label_loss (one launch); trusted is not checked here.
    The supervised CE is the special case trusted=labels, tau > 1 (no row confident, every row
    takes its label): mean CE."""
    return _MaskedPseudoLabelLoss.apply(
        weak_logits.detach(),
        strong_logits,
        tau,
        trusted,
        loss == "sce",
        alpha,
        beta,
        A,
        max_block_c,
    )


# DEC's backward in closed form, with p = (alpha+1)/2, t_ij = 1/(1 + d2_ij/alpha),
# q_ij = t_ij^p / S_i and the centred zc = z - c, mc = mu - c (distances, hence gradients, do not
# depend on c):
#   G_ij = dL/d d2_ij = -(p/alpha) t_ij q_ij (g_ij - sum_k g_ik q_ik)
#   dL/dz_i = 2 sum_j G_ij (z_i - mu_j) = 2 rowsum(G)_i zc_i - 2 (G mc)_i
#   dL/dmu_j = -2 sum_i G_ij (z_i - mu_j) = 2 colsum(G)_j mc_j - 2 (G^T zc)_j
# The kernel writes G (N x K) and the first terms; one addmm each adds the GEMM. N x K x D is
# never formed, and dL/dz costs 4 N*D of traffic (read z, write; addmm reads and writes).
class _DecSoftAssign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, centroids, alpha, max_block_k):
        (N, D), (K, D2) = z.shape, centroids.shape
        if D != D2:
            raise ValueError(f"z {tuple(z.shape)}, centroids {tuple(centroids.shape)}: D differs")
        alpha = float(alpha)
        mu = centroids.detach().float()
        # The shift, as in the reference.
        c = mu.mean(0)
        mc = (mu - c).contiguous()
        block_k = _dec_block_k(K, max_block_k)
        block_n, block_d, warps, stages = _DEC_FWD_TILES[block_k]
        q_dtype = torch.promote_types(z.dtype, centroids.dtype)
        q = torch.empty((N, K), dtype=q_dtype, device=z.device)
        rowsum = torch.empty(N, dtype=torch.float32, device=z.device)
        _dec_fwd_kernel[(triton.cdiv(N, block_n),)](
            z,
            c,
            mc,
            (mc * mc).sum(1),
            q,
            rowsum,
            N,
            K,
            D,
            z.stride(0),
            z.stride(1),
            1.0 / alpha,
            -(alpha + 1) / 2,
            ALPHA_ONE=alpha == 1.0,
            SINGLE_K=block_k >= K,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            BLOCK_D=block_d,
            num_warps=warps,
            num_stages=stages,
        )
        ctx.alpha = alpha
        ctx.mu_dtype = centroids.dtype
        ctx.save_for_backward(z, q, rowsum, c, mc)
        return q

    @staticmethod
    def backward(ctx, g):
        z, q, rowsum, c, mc = ctx.saved_tensors
        (N, K), D, alpha = q.shape, z.shape[1], ctx.alpha
        need_z, need_mu = ctx.needs_input_grad[:2]
        p = (alpha + 1) / 2
        block_n, block_k, block_d = _dec_bwd_config(K, D)
        f32 = dict(dtype=torch.float32, device=q.device)
        G = torch.empty((N, K), **f32)
        # G stands in for an output that is not wanted: the kernel does not write it.
        gz = G
        zc = G
        if need_z:
            gz = torch.empty((N, D), **f32)
        if need_mu:
            zc = torch.empty((N, D), **f32)
        _dec_bwd_kernel[(triton.cdiv(N, block_n),)](
            q,
            g,
            rowsum,
            z,
            c,
            G,
            gz,
            zc,
            N,
            K,
            D,
            g.stride(0),
            g.stride(1),
            z.stride(0),
            z.stride(1),
            1.0 / p,
            -p / alpha,
            ALPHA_ONE=alpha == 1.0,
            WRITE_GZ=need_z,
            WRITE_ZC=need_mu,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            BLOCK_D=block_d,
            num_warps=8,
        )
        grad_z = None
        grad_mu = None
        if need_z:
            grad_z = gz.addmm_(G, mc, alpha=-2).to(z.dtype)
        if need_mu:
            colsum_term = mc * (2 * G.sum(0))[:, None]
            grad_mu = torch.addmm(colsum_term, G.T, zc, alpha=-2).to(ctx.mu_dtype)
        return grad_z, grad_mu, None, None


def _dec_soft_assign_triton(z, centroids, alpha=1.0, max_block_k=_DEC_MAX_BLOCK_K):
    return _DecSoftAssign.apply(z, centroids, alpha, max_block_k)


def _aug_warps(C, H, W):
    return min(8, max(1, triton.next_power_of_2(C) * triton.next_power_of_2(H * W) // 512))


def _augment_triton(x, prm, strong):
    """augment's launch: one program per image."""
    N, C, H, W = x.shape
    out = torch.empty_like(x)
    # Equalize's per-image, per-channel lookup tables (a strong view's only scratch memory).
    lut_shape = (1,)
    if strong:
        lut_shape = (N, C, 256)
    lut = torch.empty(lut_shape, dtype=torch.uint8, device=x.device)
    if N:
        _augment_kernel[(N,)](
            x.contiguous(),
            out,
            lut,
            prm.contiguous(),
            prm.shape[1],
            C,
            H,
            W,
            STRONG=strong,
            CP=triton.next_power_of_2(C),
            HWP=triton.next_power_of_2(H * W),
            num_warps=_aug_warps(C, H, W),
            enable_fp_fusion=False,
        )
    return out


# ==== Benchmark: python kernels.py --bench [--quick] (needs a CUDA device) ========================
# Every case is timed with CUDA graphs (launches removed: the GPU's own time) and as wall time per
# call (launches included). Small shapes (one training step's calls) report microseconds: their
# GB/s would be meaningless. Large shapes report milliseconds and the GB/s of the bytes the
# operation must move, against a device-to-device copy measured in the same run (their bytes far
# exceed the 50 MB L2, so the replays read memory).
# Cases: (kind, dtype, shape, large, quick). A loss shape is (B, C), B = mu*64 = 448 in training;
# a DEC shape is (N, K, D, z needs grad, max_block_k), N = 256 being one DEC step on the centroids
# of fixed features.
_BENCH_CASES = [
    ("loss", "float32", (448, 10), False, True),
    ("loss", "float32", (448, 100), False, False),
    ("loss", "bfloat16", (448, 101), False, False),
    ("loss", "float32", (7168, 1000), True, True),
    ("loss", "bfloat16", (7168, 1000), True, False),
    ("dec", "float32", (256, 10, 1280, False, 128), False, True),
    ("dec", "float32", (256, 100, 1280, False, 128), False, False),
    ("dec", "float32", (1_000_000, 10, 1280, True, 128), True, True),
    ("dec", "float32", (1_000_000, 100, 1280, True, 128), True, False),
    # K = 100 as seven tiles of 16.
    ("dec", "float32", (1_000_000, 100, 1280, True, 16), True, False),
]


def _max_rel_err(outs, refs):
    # The worst max|a - b| / max|b| over the outputs (forward value and gradients).
    return max(
        ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
        for a, b in zip(outs, refs)
        if b is not None
    )


def _bench_loss_case(dtype, shape, dev, compile_fn):
    B, C = shape
    weak = (3 * torch.randn(B, C, device=dev)).to(dtype)
    strong = torch.randn(B, C, device=dev).to(dtype).requires_grad_()
    trusted = torch.randint(-1, C, (B,), device=dev)

    def step(f):
        strong.grad = None
        loss = f(weak, strong, 0.95, trusted, "ce")[0]
        loss.backward()
        return loss.detach(), strong.grad

    impls = dict(
        eager=masked_pseudo_label_loss_torch,
        compile=compile_fn(masked_pseudo_label_loss_torch),
        triton=_masked_pseudo_label_loss_triton,
    )
    # Read weak and strong, write d strong (backward at grad 1 moves nothing more); per row read
    # trusted (int64), write loss, mask (fp32) and label (int64).
    nbytes = 3 * B * C * strong.element_size() + B * (8 + 4 + 4 + 8)
    return f"loss {str(dtype)[6:]} B={B} C={C}", nbytes, impls, step


def _bench_dec_case(dtype, shape, dev, compile_fn):
    N, K, D, grad_z, block_k = shape
    z = torch.randn(N, D, device=dev, dtype=dtype).requires_grad_(grad_z)
    mu = torch.randn(K, D, device=dev, dtype=dtype).requires_grad_()
    g = torch.randn(N, K, device=dev, dtype=dtype)

    def step(f):
        z.grad = None
        mu.grad = None
        q = f(z, mu)
        q.backward(g)
        return q.detach(), z.grad, mu.grad

    impls = dict(triton=functools.partial(_dec_soft_assign_triton, alpha=1.0, max_block_k=block_k))
    name = f"dec {str(dtype)[6:]} N={N} K={K} D={D}"
    if grad_z:
        name += " +dz"
    if block_k == _DEC_MAX_BLOCK_K:
        eager = dict(eager=dec_soft_assign_torch, compile=compile_fn(dec_soft_assign_torch))
        impls = dict(**eager, **impls)
    else:
        # The variant row times the kernel alone.
        name += f" BLOCK_K={block_k}"
    # The forward reads z and writes q; the backward reads g and z and writes dz (if z needs it).
    nbytes = z.element_size() * (N * D * (3 if grad_z else 2) + 2 * N * K)
    return name, nbytes, impls, step


def _bench_case(kind, dtype, shape, dev, compile_fn):
    """(name, bytes, {impl: f}, step(f) -> outputs) of one case. step runs forward + backward."""
    if kind == "loss":
        return _bench_loss_case(getattr(torch, dtype), shape, dev, compile_fn)
    return _bench_dec_case(getattr(torch, dtype), shape, dev, compile_fn)


def _bench_impls(res, impls, step, timers):
    """Times each implementation into res; returns the outputs of eager and triton, for "err"."""
    outs = {}
    unit = 1e3 if res["large"] else 1
    for key, f in impls.items():
        try:
            # The warm-up (it compiles), and the values compared in "err".
            out = step(f)
            if key != "compile":
                outs[key] = out
            run = functools.partial(step, f)
            res["t"][key] = timers.graph(run) / unit
            res["wall"][key] = timers.wall(run) / unit
        except Exception as e:
            # Out of memory or a failed compile: noted in the table, and the run goes on.
            res["notes"].append(f"{key}: {type(e).__name__}: {str(e).strip()[:120]}")
    return outs


def _bench_run(cases, dev, timers, compile_fn, log=print):
    """One result dict per case; a case or implementation that fails (OOM, compile error) is
    noted and the run goes on. timers: graph(fn) -> us, wall(fn) -> us."""
    results = []
    for kind, dtype, shape, large, _ in cases:
        res = dict(name=f"{kind} {dtype} {shape}", large=large, t={}, wall={}, notes=[])
        try:
            res["name"], res["bytes"], impls, step = _bench_case(
                kind, dtype, shape, dev, compile_fn
            )
            outs = _bench_impls(res, impls, step, timers)
            if "eager" in outs and "triton" in outs:
                res["err"] = _max_rel_err(outs["triton"], outs["eager"])
        except Exception as e:
            res["notes"].append(f"{type(e).__name__}: {str(e).strip()[:120]}")
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        results.append(res)
        log(res)
    return results


def _cell(x, width, prec, suffix=""):
    if x is None:
        return "-".rjust(width)
    return f"{x:.{prec}f}{suffix}".rjust(width)


def _bench_large_columns(r, tri, speedups, copy_gbs):
    """(GB/s and % of copy cells, goal or None) of a large-shape result."""
    gbs = None
    pct = None
    if tri is not None:
        gbs = r["bytes"] / tri / 1e6
        pct = 100 * gbs / copy_gbs
    goal = None
    vs_eager, vs_compile = speedups
    if r["name"].startswith("loss") and None not in (pct, vs_compile):
        met = pct >= 80 and vs_compile >= 1.3
        goal = (f"{pct:.0f} % of copy, {vs_compile:.2f}x compile", met)
    elif r["name"].startswith("dec") and vs_eager is not None:
        goal = (f"{vs_eager:.2f}x eager", vs_eager >= 2)
    return _cell(gbs, 8, 0) + _cell(pct, 8, 0), goal


def _bench_row(r, copy_gbs):
    """(table line and notes, goal or None) of one result."""
    e, c, tri = (r["t"].get(k) for k in ("eager", "compile", "triton"))
    speedups = [None if x is None or tri is None else x / tri for x in (e, c)]
    extra = ""
    goal = None
    if r["large"]:
        extra, goal = _bench_large_columns(r, tri, speedups, copy_gbs)
    wall_prec = 2 if r["large"] else 0
    walls = [_cell(r["wall"].get(k), 0, wall_prec) for k in ("eager", "compile", "triton")]
    wall = "/".join(walls)
    prec = 3 if r["large"] else 1
    err = "-" if r.get("err") is None else f"{r['err']:.1e}"
    line = (
        f"{r['name']:<40}{_cell(e, 9, prec)}{_cell(c, 9, prec)}{_cell(tri, 9, prec)}"
        f"{_cell(speedups[0], 9, 2, 'x')}{_cell(speedups[1], 8, 2, 'x')}{wall:>18}{extra:>16}"
        f"{err:>9}"
    )
    return "\n".join([line] + [f"    ! {n}" for n in r["notes"]]), goal


def _bench_table(results, copy_gbs):
    """The two tables (small shapes in us, large in ms with GB/s) and the goals, as text."""
    lines, goals = [], []
    for large in (False, True):
        unit = "ms" if large else "us"
        lines += [
            f"\n{'large' if large else 'small'} shapes ({unit}: CUDA graph; wall: per call, "
            f"launches included; forward + backward)",
            f"{'case':<40}{'eager':>9}{'compile':>9}{'triton':>9}{'vs eager':>9}"
            f"{'vs comp':>8}{'wall e/c/t ' + unit:>18}{'GB/s  % copy' if large else '':>16}"
            f"{'err':>9}",
        ]
        for r in results:
            if r["large"] != large:
                continue
            text, goal = _bench_row(r, copy_gbs)
            lines.append(text)
            if goal:
                goals.append(f"  {r['name']}: {goal[0]}: {'met' if goal[1] else 'MISSED'}")
    lines.append("\ngoals (large shapes): loss >= 80 % of copy, >= 1.3x compile; DEC >= 2x eager")
    return "\n".join(lines + goals)


def _wall_us(fn, n=100):
    """Wall time per call of fn in microseconds, launches included, after 5 warm-up calls."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - t0) / n


def _graph_us(fn):
    """The GPU's own time per call of fn in microseconds (CUDA graph replays), from at least
    ~25 replays however long one takes."""
    from triton.testing import do_bench_cudagraph

    est_ms = _wall_us(fn, n=3) / 1e3
    return 1e3 * do_bench_cudagraph(fn, rep=max(50, 25 * est_ms), return_mode="median")


def _compile_fresh(f):
    # A fresh compile per shape: no recompiles or dynamic shapes timed.
    torch._dynamo.reset()
    return torch.compile(f, dynamic=False)


def _copy_gbs(dev):
    """A device-to-device copy's GB/s (read + write) of 1 GiB, far beyond the L2."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    return 2 * src.numel() / _graph_us(functools.partial(dst.copy_, src)) / 1e3


def _bench_self_checks(dev):
    """Each kernel's first use on dev, as a training run's would go (self-check, compile
    included), then a second self_check of the compiled kernel; times and provenance printed."""
    f32 = dict(device=dev)
    first_inputs = {
        "augment": (torch.zeros(1, 3, 32, 32, dtype=torch.uint8, device=dev),),
        "masked_pseudo_label_loss": (
            torch.zeros(448, 10, **f32),
            torch.zeros(448, 10, **f32),
            0.1,
            1.0,
            -4.0,
        ),
        "dec_soft_assign": (torch.zeros(256, 1280, **f32), torch.zeros(10, 1280, **f32), 1.0),
    }
    for kernel, inputs in first_inputs.items():
        device = inputs[0].device
        t0 = time.perf_counter()
        _takes_triton(kernel, device, _use_triton(inputs[0]), inputs)
        torch.cuda.synchronize()
        first_ms = 1e3 * (time.perf_counter() - t0)
        t0 = time.perf_counter()
        self_check(kernel, *inputs)
        torch.cuda.synchronize()
        again_ms = 1e3 * (time.perf_counter() - t0)
        path = provenance()[kernel]["path"]
        print(
            f"self-check {kernel}: {path}; first use {first_ms:.0f} ms (compile included), "
            f"a second check {again_ms:.1f} ms",
            flush=True,
        )


def _bench_header(dev, copy_gbs):
    print(
        f"device: {torch.cuda.get_device_name(dev)}; torch {torch.__version__}, triton "
        f"{triton.__version__}; allow_tf32 matmul/cudnn: "
        f"{torch.backends.cuda.matmul.allow_tf32}/{torch.backends.cudnn.allow_tf32}, "
        f"float32_matmul_precision {torch.get_float32_matmul_precision()}"
    )
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write), the 100 % of '% copy'")
    print(
        "GB/s counts the bytes the op must move: loss = read weak + strong, write d strong, "
        "per-row labels/mask/loss;\nDEC = read z, write q, read g and z, write dz (if z needs "
        "it). vs eager / vs comp: their time / Triton's. err: max |triton - eager| / max |eager| "
        "over value and grads"
    )
    B, C = 448, 100
    trusted = torch.randint(-1, C, (B,), device=dev)
    check_us = _wall_us(functools.partial(check_trusted, trusted, C))
    print(
        f"check_trusted (masked_pseudo_label_loss's check=True, one aminmax + sync): "
        f"{check_us:.0f} us wall per call",
        flush=True,
    )


def _bench(quick=False, only=None):
    if not torch.cuda.is_available():
        print("kernels.py --bench needs a CUDA device; none is available here.")
        sys.exit(2)
    if not _HAS_TRITON:
        print("kernels.py --bench needs triton; it does not import here.")
        sys.exit(2)
    # Pinned: eager and compiled GEMMs in full fp32, as accurate as the kernels' 3xTF32.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    copy_gbs = _copy_gbs(dev)
    _bench_header(dev, copy_gbs)
    _bench_self_checks(dev)
    cases = [c for c in _BENCH_CASES if (c[4] or not quick) and only in (None, c[0])]
    print("rows as they finish (columns as in the tables at the end):", flush=True)
    timers = types.SimpleNamespace(graph=_graph_us, wall=_wall_us)

    def log(r):
        print(_bench_row(r, copy_gbs)[0], flush=True)

    results = _bench_run(cases, dev, timers, _compile_fresh, log=log)
    print(_bench_table(results, copy_gbs))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bench",
        action="store_true",
        help="time the Triton kernels against eager and torch.compile (CUDA)",
    )
    parser.add_argument("--quick", action="store_true", help="with --bench: four cases only")
    parser.add_argument("--only", choices=("loss", "dec"), help="with --bench: one kernel's cases")
    args = parser.parse_args()
    if args.bench:
        _bench(args.quick, args.only)
    else:
        parser.print_help()
