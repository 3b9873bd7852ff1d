"""Fused kernels for kdfixmatch.py's three hot spots, behind plain functions.

    masked_pseudo_label_loss  FixMatch's unlabeled term (+ Heuristic 1 and CE/SCE)
    dec_soft_assign           DEC's Student-t soft assignment (Xie et al. 2016, eq. 1)
    augment                   FixMatch's weak and strong views (flip, shift, RandAugment, Cutout)

The first two dispatch to a Triton kernel for CUDA tensors when triton imports, and to the PyTorch
reference below otherwise (CPU, or KDFM_NO_TRITON=1). augment is the kernel alone: its reference,
and the dispatch, is kdfixmatch.apply_plan. The references define the semantics.

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
import os
import sys
import time
import types

import torch


def _use_triton(t):
    return t.is_cuda and _HAS_TRITON and os.environ.get("KDFM_NO_TRITON") != "1"


# ---------------------------------------------------------------------------------------------
# Masked pseudo-label loss: reference
def masked_pseudo_label_loss_torch(
    weak_logits, strong_logits, tau, trusted=None, loss="ce", alpha=0.1, beta=1.0, A=-4.0
):
    probs = weak_logits.detach().float().softmax(-1)
    conf, target = probs.max(-1)  # pseudo label = argmax of the weak view
    mask = conf >= tau
    if trusted is not None:  # Heuristic 1: confident inner label first,
        outer = ~mask & (trusted >= 0)  # else the trusted outer label, else masked
        target = torch.where(outer, trusted.to(target.dtype), target)
        mask = mask | outer
    logp_y = strong_logits.float().log_softmax(-1).gather(-1, target[:, None]).squeeze(-1)
    row = -logp_y  # CE
    if loss == "sce":  # alpha*CE + beta*RCE, RCE = -A * (1 - p_y)
        row = alpha * row - beta * A * (1 - logp_y.exp())
    row = torch.where(mask, row, torch.zeros_like(row))  # where, not *: masked inf stays out
    return row.mean(), mask.float(), target


def check_trusted(trusted, num_classes):
    """trusted, or ValueError unless every outer label lies in [-1, num_classes). One aminmax and one
    device-to-host copy: on a GPU that is a sync, so a training loop checks its whole trusted
    vector once and then calls masked_pseudo_label_loss(..., check=False)."""
    if trusted.is_floating_point() or trusted.is_complex():
        raise ValueError(f"trusted must be an integer tensor, got {trusted.dtype}")
    if trusted.numel():
        lo, hi = torch.stack(torch.aminmax(trusted)).tolist()
        bad = lo if lo < -1 else hi if hi >= num_classes else None
        if bad is not None:
            raise ValueError(
                f"trusted labels must lie in [-1, {num_classes}) (-1 = untrusted), got {bad}"
            )
    return trusted


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
    """FixMatch's unlabeled loss, mean over ALL rows of mask * per-row loss.

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
    if _use_triton(strong_logits):
        return _masked_pseudo_label_loss_triton(
            weak_logits, strong_logits, tau, trusted, loss, alpha, beta, A
        )
    return masked_pseudo_label_loss_torch(
        weak_logits, strong_logits, tau, trusted, loss, alpha, beta, A
    )


# ---------------------------------------------------------------------------------------------
# DEC soft assignment: reference
def dec_soft_assign_torch(z, centroids, alpha=1.0):
    # |z - mu|^2 = |z|^2 + |mu|^2 - 2 z.mu never materialises N x K x D, but cancels when the
    # features share a large offset; shifting z and mu by the centroids' mean c leaves every
    # distance (and gradient: c is a constant) unchanged and keeps the terms small
    c = centroids.detach().mean(0)
    zc, mc = z - c, centroids - c
    d2 = (zc * zc).sum(1, keepdim=True) + (mc * mc).sum(1) - 2 * zc @ mc.T
    q = (1 + d2.clamp_min(0) / alpha).pow(-(alpha + 1) / 2)
    return q / q.sum(1, keepdim=True)


def dec_soft_assign(z, centroids, alpha=1.0):
    """q_ij = (1 + |z_i - mu_j|^2 / alpha)^(-(alpha+1)/2), normalised over j. N x K, rows sum to 1,
    differentiable with respect to z and centroids."""
    if _use_triton(z):
        return _dec_soft_assign_triton(z, centroids, alpha)
    return dec_soft_assign_torch(z, centroids, alpha)


# ---------------------------------------------------------------------------------------------
# Triton kernels. Every pointer offset is int64 (indices widened before any stride product).
try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except Exception:  # no triton (or a broken install): the references serve
    _HAS_TRITON = False

# Launch configurations. Triton's ahead-of-time compile for sm_90 (test_kernels_compile_for_sm90)
# gives every variant below no register spills.
_TILE = 2048  # elements per (rows x columns) tile of the row-wise kernels (8 warps)
_LOSS_MAX_BLOCK_C = 2048  # wider rows loop over column blocks (online max / sum-exp)
_DEC_MAX_BLOCK_K = 128
# DEC forward, per centroid tile width: (rows, features per tl.dot step, warps, pipeline stages).
# A 128-wide tile leaves no registers for software pipelining
_DEC_FWD_TILES = {16: (64, 16, 4, 3), 32: (64, 16, 4, 3), 64: (64, 16, 8, 3), 128: (64, 16, 8, 1)}


def _pl_config(B, C, max_block_c=_LOSS_MAX_BLOCK_C):
    block_c = min(triton.next_power_of_2(C), max_block_c)
    return max(1, min(_TILE // block_c, 64, triton.next_power_of_2(B))), block_c  # rows, cols


def _dec_block_k(K, max_block_k=_DEC_MAX_BLOCK_K):
    # tl.dot tiles are powers of two >= 16. Up to 128 centroids take one tile, so the forward
    # reads z once: K = 10 pads to 16 (bandwidth-bound there, so the padding moves no bytes) and
    # K = 100 to 128 (22 % of the MMAs; seven 16-wide tiles would pad 12 % but stream z seven
    # times: `--bench` times both). Wider K loops over 128-wide tiles.
    return max(16, min(triton.next_power_of_2(K), max_block_k))


def _dec_bwd_config(K, D):
    block_k = min(triton.next_power_of_2(K), 1024)
    block_n = max(1, min(_TILE // block_k, 64))
    return block_n, block_k, max(16, min(triton.next_power_of_2(D), _TILE // block_n))


if _HAS_TRITON:

    @triton.jit
    def _load_logits(ptr, rows, cols, stride_r, stride_c, C):
        # padded columns read -inf: they drop out of every max and sum-exp
        offs = rows[:, None] * stride_r + cols.to(tl.int64)[None, :] * stride_c
        return tl.load(ptr + offs, mask=cols[None, :] < C, other=float("-inf")).to(tl.float32)

    @triton.jit
    def _online_max_sumexp(m, s, x):
        # running row max m and sum exp(x - m), updated with a (rows x cols) tile x
        m_new = tl.maximum(m, tl.max(x, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: no inf - inf
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), 1)
        return m_new, s

    @triton.jit
    def _online_argmax(m, arg, x, cols):
        # first index of the row max (torch.max's tie rule): a later block wins only if larger
        bm = tl.max(x, 1)
        barg = tl.min(tl.where(x == bm[:, None], cols[None, :], 2147483647), 1)
        return tl.where(bm > m, barg, arg)

    @triton.jit
    def _pl_grad_tile(s, cols, target, s_max, log_sum, coef):
        # coef * (softmax(s) - onehot(target)); coef is 0 on masked rows, where() keeps NaN out.
        # (s - max) - log_sum, not s - lse: exact for huge logits, where lse would round
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
        rows = tl.minimum(rows, B - 1).to(tl.int64)  # tail rows re-read row B-1, never stored
        cols = tl.arange(0, BLOCK_C)
        neg_inf = tl.full([BLOCK_R], float("-inf"), tl.float32)
        zero = tl.zeros([BLOCK_R], tl.float32)
        w_arg = tl.zeros([BLOCK_R], tl.int32)

        # -- pass 1: weak max / argmax / sum-exp and strong max / sum-exp
        if SINGLE_BLOCK:  # the row fits one tile: each logit is read once, s stays for the grad
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

        # -- Heuristic 1: confident inner label, else the trusted outer label, else masked.
        # conf = max softmax prob = 1 / sum exp(w - max), divided with round-to-nearest: GPU '/'
        # (div.full) is approximate and could flip conf >= tau within an ulp of tau. The rule:
        # mask = div_rn(1, sum) >= tau; exp is the hardware one, as torch's is, so a row whose
        # terms are exact (0 or 1) decides exactly as the reference does. A NaN or +inf weak
        # logit makes the sum NaN: conf NaN and label 0, torch's NaN softmax and first-NaN max
        # (written out, not left to tl.max: the GPU's skips NaN, the interpreter's propagates it)
        conf = tl.math.div_rn(tl.full([BLOCK_R], 1.0, tl.float32), w_sum)
        conf = tl.where(w_max == float("-inf"), float("nan"), conf)  # all -inf: NaN in torch too
        keep = conf >= tau
        target = tl.where(w_sum != w_sum, 0, w_arg).to(tl.int64)
        if HAS_TRUSTED:  # labels checked on the host (check_trusted): in [-1, C)
            trusted = tl.load(trusted_ptr + rows * st_r).to(tl.int64)
            outer = (keep == 0) & (trusted >= 0)
            target = tl.where(outer, trusted, target)
            keep = keep | outer

        # -- per-row loss against the target: CE = log sum exp(s) - s_y,
        # SCE = alpha*CE - beta*A*(1 - p_y)
        s_max = tl.where(s_max == float("-inf"), 0.0, s_max)  # all -inf row: NaN loss, or 0 masked
        log_sum = tl.log(s_sum)
        if SINGLE_BLOCK:
            s_y = tl.sum(tl.where(cols[None, :] == target[:, None], s, 0.0), 1)
        else:
            s_y = tl.load(strong_ptr + rows * ss_r + target * ss_c).to(tl.float32)
        ce = log_sum - (s_y - s_max)
        if SCE:
            p_y = tl.exp(-ce)
            row_loss = alpha * ce - beta_A * (1.0 - p_y)
            coef = alpha - beta_A * p_y  # d row_loss / d s = coef * (softmax - onehot)
        else:
            row_loss = ce
            coef = tl.full([BLOCK_R], 1.0, tl.float32)
        row_loss = tl.where(keep, row_loss, 0.0)  # where, not *: a masked inf stays out
        coef = tl.where(keep, coef * grad_scale, 0.0)
        tl.store(row_loss_ptr + rows, row_loss, mask=row_ok)
        tl.store(mask_ptr + rows, keep.to(tl.float32), mask=row_ok)
        tl.store(target_ptr + rows, target, mask=row_ok)

        # -- pass 2: d loss / d strong, written in the input dtype
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
        # data moves, and no host sync is needed to find that out
        s = tl.load(scale_ptr + tl.zeros([BLOCK], tl.int32)).to(tl.float32)  # one value, BLOCK x
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = (offs < n) & (s != 1.0)
        x = tl.load(x_ptr + offs, mask=ok).to(tl.float32)
        tl.store(x_ptr + offs, (x * s).to(x_ptr.dtype.element_ty), mask=ok)

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
        # unnormalised Student-t kernel (1 + d2/alpha)^(-p) of a (rows x centroids) tile, with
        # d2 = |zc|^2 + |mc|^2 - 2 zc.mc on the centred zc = z - c, mc = mu - c (the reference's
        # shift), accumulated over D blocks. tf32x3 (3xTF32) keeps the dot fp32-accurate on
        # tensor cores, and the centring keeps its rounding small against the distances
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
            mt = tl.load(
                mc_ptr + ks[None, :] * D + d[:, None],  # (features x centroids)
                mask=(ks < K)[None, :] & (d < D)[:, None],
                other=0.0,
            )
            zmu = tl.dot(zt, mt, acc=zmu, input_precision="tf32x3")
            zz += tl.sum(zt * zt, 1)
        mm = tl.load(mm_ptr + ks, mask=ks < K, other=0.0)
        d2 = tl.maximum(zz[:, None] + mm[None, :] - 2.0 * zmu, 0.0)  # a difference: clamp at 0
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
            if SINGLE_K:  # all K in one tile: normalise in registers, write q once
                u = u / rowsum[:, None]
            tl.store(
                q_ptr + rows[:, None] * K + (k0 + kk)[None, :],
                u.to(q_ptr.dtype.element_ty),
                mask=row_ok[:, None] & ((k0 + kk) < K)[None, :],
            )
        if not SINGLE_K:  # K spans several tiles: rescale the unnormalised rows just written
            tl.debug_barrier()  # make this program's stores visible to all its threads
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
        # (dL/dz before "- 2 G mc") and zc itself (for dL/dmu = -2 (G^T zc - colsum(G) mc))
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
            if not ALPHA_ONE:  # floor: log(0) of padded/underflowed q; G is ~0 there anyway
                t = tl.exp(tl.log(tl.maximum(t, 1e-30)) * inv_p)
            G = coef * t * q * (g - r[:, None])
            G_rowsum += tl.sum(G, 1)
            tl.store(G_ptr + rows[:, None] * K + (k0 + kk)[None, :], G, mask=ok)
        ds = tl.arange(0, BLOCK_D).to(tl.int64)
        for d0 in range(0, D, BLOCK_D):  # backward runs only when one of the two is wanted
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

    # -- FixMatch augmentation: one program per image, its channels x pixels in one tile -------
    @triton.jit
    def _blend(a, b, g):
        # the reference's fma: a + b * g in float64 (g: float32, or a float32 value's literal),
        return (a.to(tl.float64) + b.to(tl.float64) * g).to(tl.float32)  # rounded once

    @triton.jit
    def _to_u8(v):
        # clamp(0, 255).to(uint8): the fraction is cut off
        return tl.minimum(tl.maximum(v, 0.0), 255.0).to(tl.int32)

    @triton.jit
    def _nearest(v):
        # grid_sample's nearest pixel: round half to even (v + 0.5 can round in float32)
        fl = tl.floor(v)
        d = v - fl
        up = (d > 0.5) | ((d == 0.5) & (fl.to(tl.int32) % 2 != 0))
        return tl.where(up, fl + 1, fl).to(tl.int32)

    @triton.jit
    def _reread(buf, img, own, src, ok, fill):
        # the tile through this image's output rows: every thread's stores land before any
        # thread reads another's pixel, and every read before the next store
        tl.store(buf + own, img.to(tl.uint8), mask=own >= 0)
        tl.debug_barrier()
        v = tl.load(buf + src, mask=ok, other=fill).to(tl.int32)
        tl.debug_barrier()
        return v

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
        y, x = p // W, p % W
        buf = out_ptr + n * (C * H * W)
        own = tl.where(valid, c * (H * W) + p, -1)
        row = prm_ptr + n * P
        # weak view: flip, then shift (dy, dx) with reflect padding
        sy, sx = y + tl.load(row + 1).to(tl.int32), x + tl.load(row + 2).to(tl.int32)
        sy = tl.where(sy >= H, 2 * (H - 1) - sy, tl.abs(sy))
        sx = tl.where(sx >= W, 2 * (W - 1) - sx, tl.abs(sx))
        sx = tl.where(tl.load(row) > 0, W - 1 - sx, sx)
        img = tl.load(x_ptr + n * (C * H * W) + c * (H * W) + sy * W + sx, mask=valid, other=0).to(
            tl.int32
        )
        if STRONG:
            for j in tl.static_range(2):  # FixMatch's RandAugment, 2 slots
                q = row + 5 + 11 * j  # op, f, 1 - f, mask, thr, theta
                op, f, g = tl.load(q).to(tl.int32), tl.load(q + 1), tl.load(q + 2)
                if C == 1:  # color on one channel: as PIL,
                    op = tl.where(op == 4, 0, op)  # nothing
                xf = img.to(tl.float32)
                if op == 1:  # autocontrast, per channel
                    lo = tl.min(tl.where(valid, xf, 255.0), 1)[:, None]
                    hi = tl.max(tl.where(valid, xf, 0.0), 1)[:, None]
                    img = _to_u8(
                        tl.math.div_rn(
                            xf - tl.where(hi == lo, 0.0, lo),
                            tl.where(hi == lo, 1.0, (hi - lo) * (1 / 255)),
                        )
                    )
                elif op == 2:  # equalize, per channel (PIL's LUT)
                    bins = tl.arange(0, 256)
                    for k in tl.static_range(C):
                        hist = tl.histogram(tl.sum(tl.where((c == k) & valid, img, 0), 0), 256)
                        hist = tl.where(bins == 0, hist - (HWP - H * W), hist)  # the padding
                        last = tl.max(tl.where(hist > 0, bins, 0), 0)  # the top value's count
                        step = (H * W - tl.sum(tl.where(bins == last, hist, 0), 0)) // 255
                        lut = (tl.cumsum(hist, 0) - hist + step // 2) // tl.maximum(step, 1)
                        lut = tl.where(step == 0, bins, tl.minimum(lut, 255))
                        tl.store(lut_ptr + (n * C + k) * 256 + bins, lut.to(tl.uint8))
                    tl.debug_barrier()
                    img = tl.load(lut_ptr + (n * C + c) * 256 + img, mask=valid).to(tl.int32)
                    tl.debug_barrier()
                elif op == 3:  # brightness: blend with black
                    img = _to_u8(xf * f)
                elif (op == 4) | (op == 5):  # color, contrast: blend with the
                    if C == 3:  # gray image or its mean.
                        r = tl.sum(tl.where(c == 0, xf, 0.0), 0)[None, :] * 0.2989
                        r = _blend(
                            r, tl.sum(tl.where(c == 1, xf, 0.0), 0)[None, :], 0.5870000123977661
                        )  # TF.rgb_to_grayscale: two fused
                        r = _blend(
                            r, tl.sum(tl.where(c == 2, xf, 0.0), 0)[None, :], 0.11400000005960464
                        )  # mul-adds by float32(0.587) and
                        gray = r.to(tl.int32).to(tl.float32)  # float32(0.114), exact in float64
                    else:
                        gray = xf
                    mean = tl.sum(tl.sum(tl.where(valid & (c == 0), gray, 0.0), 1), 0)
                    gray = tl.where(op == 5, tl.math.div_rn(mean, H * W * 1.0), gray)
                    img = _to_u8(_blend(xf * f, gray, g))
                elif op == 6:  # sharpness: the 3x3 (1 1 1, 1 5 1,
                    inner = valid & (y >= 1) & (y < H - 1) & (x >= 1) & (x < W - 1)  # 1 1 1)
                    s = 4 * img  # blur, exact in integers; the
                    tl.store(buf + own, img.to(tl.uint8), mask=valid)  # border is kept
                    tl.debug_barrier()
                    for d in tl.static_range(9):
                        s += tl.load(
                            buf + own + (d // 3 - 1) * W + d % 3 - 1, mask=inner, other=0
                        ).to(tl.int32)
                    tl.debug_barrier()
                    s = ((s + 6) // 13 - img).to(tl.float32)
                    img = tl.where(inner, _to_u8(_blend(xf, s, g)), img)
                elif op == 7:  # posterize: keep the top bits
                    img = img & tl.load(q + 3).to(tl.int32)
                elif op == 8:  # solarize: invert from thr up
                    img = tl.where(img >= tl.load(q + 4).to(tl.int32), 255 - img, img)
                elif op >= 9:  # rotate, shear, translate: the
                    gx = x.to(tl.float32) - (W - 1) * 0.5  # affine grid of `affine`, then
                    gy = y.to(tl.float32) - (H - 1) * 0.5  # grid_sample (nearest, fill 128)
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
                    u, v = _nearest(((u + 1) * W - 1) * 0.5), _nearest(((v + 1) * H - 1) * 0.5)
                    ok = valid & (u >= 0) & (u < W) & (v >= 0) & (v < H)
                    img = _reread(buf, img, own, c * (H * W) + v * W + u, ok, 128)
            iy = y - tl.load(row + 3).to(tl.int32) + H // 4  # Cutout: half the side, gray
            ix = x - tl.load(row + 4).to(tl.int32) + W // 4
            img = tl.where((iy >= 0) & (iy < H // 2) & (ix >= 0) & (ix < W // 2), 127, img)
        tl.store(buf + own, img.to(tl.uint8), mask=valid)


# ---------------------------------------------------------------------------------------------
# Masked pseudo-label loss: autograd wrapper (the gradient is written by the forward kernel)
class _MaskedPseudoLabelLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weak_logits, strong_logits, tau, trusted, sce, alpha, beta, A, max_block_c):
        B, C = strong_logits.shape
        if weak_logits.shape != (B, C) or C < 1 or B < 1:
            raise ValueError(f"weak {tuple(weak_logits.shape)} and strong {(B, C)} must match")
        dev = strong_logits.device
        block_r, block_c = _pl_config(B, C, max_block_c)
        write_grad = ctx.needs_input_grad[1]
        grad = torch.empty((B, C), dtype=strong_logits.dtype, device=dev) if write_grad else None
        row_loss = torch.empty(B, dtype=torch.float32, device=dev)
        mask = torch.empty(B, dtype=torch.float32, device=dev)
        target = torch.empty(B, dtype=torch.int64, device=dev)
        _pl_loss_kernel[(triton.cdiv(B, block_r),)](
            weak_logits,
            strong_logits,
            trusted if trusted is not None else target,
            grad if write_grad else row_loss,
            row_loss,
            mask,
            target,
            B,
            C,
            weak_logits.stride(0),
            weak_logits.stride(1),
            strong_logits.stride(0),
            strong_logits.stride(1),
            trusted.stride(0) if trusted is not None else 0,
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
        # scaled in place, no B x C allocation; the saved buffer is spent (a second backward
        # through the same graph fails autograd's version check rather than scaling it twice)
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


# ---------------------------------------------------------------------------------------------
# DEC soft assignment: autograd wrapper
# Backward closed form, with p = (alpha+1)/2, t_ij = 1/(1 + d2_ij/alpha), q_ij = t_ij^p / S_i and
# the centred zc = z - c, mc = mu - c (distances, hence gradients, do not depend on c):
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
        c = mu.mean(0)  # the shift, as in the reference
        mc = (mu - c).contiguous()
        block_k = _dec_block_k(K, max_block_k)
        block_n, block_d, warps, stages = _DEC_FWD_TILES[block_k]
        q = torch.empty(
            (N, K), dtype=torch.promote_types(z.dtype, centroids.dtype), device=z.device
        )
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
        ctx.alpha, ctx.mu_dtype = alpha, centroids.dtype
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
        gz = torch.empty((N, D), **f32) if need_z else G  # G: an unused placeholder
        zc = torch.empty((N, D), **f32) if need_mu else G
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
        grad_z = gz.addmm_(G, mc, alpha=-2).to(z.dtype) if need_z else None
        grad_mu = (
            torch.addmm(mc * (2 * G.sum(0))[:, None], G.T, zc, alpha=-2).to(ctx.mu_dtype)
            if need_mu
            else None
        )
        return grad_z, grad_mu, None, None


def _dec_soft_assign_triton(z, centroids, alpha=1.0, max_block_k=_DEC_MAX_BLOCK_K):
    return _DecSoftAssign.apply(z, centroids, alpha, max_block_k)


# ---------------------------------------------------------------------------------------------
# FixMatch augmentation: a whole weak or strong view of a batch in one launch
AUG_MAX_PIXELS = 1024  # H * W of one image's tile in registers (32 x 32; 64 x 64 spills)


def augment_takes(x):
    """Whether augment serves the batch x: CUDA images of up to AUG_MAX_PIXELS pixels."""
    return _use_triton(x) and x.shape[-2] * x.shape[-1] <= AUG_MAX_PIXELS


def _aug_warps(C, H, W):
    return min(8, max(1, triton.next_power_of_2(C) * triton.next_power_of_2(H * W) // 512))


def augment(x, prm, strong):
    """Weak or strong views of the uint8 batch x (N, C, H, W), C = 1 or 3, from per-sample
    parameter rows prm (N, P) float32, as kdfixmatch.apply_plan lays them out: flip, dy, dx and,
    for strong views, Cutout's cy, cx, then per op slot: op, f, 1 - f, posterize mask, solarize
    threshold, the affine theta (6). Each image is one program: its ops run in order on a tile
    that stays in registers, so the view costs one launch where apply_plan issues some 200 (a
    CPU cannot issue those as fast as an H100 trains a bf16 WRN-28-2 step). Same arithmetic as
    apply_plan, rounded step by step (no fused multiply-add, IEEE division): the same pixels."""
    N, C, H, W = x.shape
    out = torch.empty_like(x)
    lut = torch.empty((N, C, 256) if strong else (1,), dtype=torch.uint8, device=x.device)
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


# ---------------------------------------------------------------------------------------------
# Benchmark: python kernels.py --bench [--quick] (needs a CUDA device)
# Every case is timed with CUDA graphs (launches removed: the GPU's own time) and as wall time per
# call (launches included). Small shapes (one training step's calls) report microseconds: their
# GB/s would be meaningless. Large shapes report milliseconds and the GB/s of the bytes the
# operation must move, against a device-to-device copy measured in the same run (their bytes far
# exceed the 50 MB L2, so the replays read memory).
# (kind, dtype, shape, large, quick); loss shape (B, C), B = mu*64 = 448 in training; DEC shape
# (N, K, D, z needs grad, max_block_k): N = 256 is one DEC step on the centroids of fixed features
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
    ("dec", "float32", (1_000_000, 100, 1280, True, 16), True, False),  # K as 7 tiles of 16
]


def _max_rel_err(outs, refs):
    # worst max|a - b| / max|b| over the outputs (forward value and gradients)
    return max(
        ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
        for a, b in zip(outs, refs)
        if b is not None
    )


def _bench_case(kind, dtype, shape, dev, compile_fn):
    """(name, bytes, {impl: f}, step(f) -> outputs) of one case. step runs forward + backward."""
    dtype = getattr(torch, dtype)
    if kind == "loss":
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
        # read weak and strong, write d strong (backward at grad 1 moves nothing more); per row
        # read trusted (int64), write loss, mask (fp32) and label (int64)
        nbytes = 3 * B * C * strong.element_size() + B * (8 + 4 + 4 + 8)
        return f"loss {str(dtype)[6:]} B={B} C={C}", nbytes, impls, step
    N, K, D, grad_z, block_k = shape
    z = torch.randn(N, D, device=dev, dtype=dtype).requires_grad_(grad_z)
    mu = torch.randn(K, D, device=dev, dtype=dtype).requires_grad_()
    g = torch.randn(N, K, device=dev, dtype=dtype)

    def step(f):
        z.grad = mu.grad = None
        q = f(z, mu)
        q.backward(g)
        return q.detach(), z.grad, mu.grad

    impls = dict(triton=lambda a, b: _dec_soft_assign_triton(a, b, 1.0, block_k))
    if block_k == _DEC_MAX_BLOCK_K:  # the variant row times the kernel alone
        impls = dict(
            eager=dec_soft_assign_torch, compile=compile_fn(dec_soft_assign_torch), **impls
        )
    # forward reads z and writes q; backward reads g and z and writes dz (if z needs it)
    nbytes = z.element_size() * (N * D * (3 if grad_z else 2) + 2 * N * K)
    name = (
        f"dec {str(dtype)[6:]} N={N} K={K} D={D}"
        + (" +dz" if grad_z else "")
        + ("" if block_k == _DEC_MAX_BLOCK_K else f" BLOCK_K={block_k}")
    )
    return name, nbytes, impls, step


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
            outs = {}
            for key, f in impls.items():
                try:
                    out = step(f)  # warm-up (compiles) and the values compared in "err"
                    if key != "compile":
                        outs[key] = out
                    del out
                    res["t"][key] = timers.graph(lambda f=f: step(f)) / (1e3 if large else 1)
                    res["wall"][key] = timers.wall(lambda f=f: step(f)) / (1e3 if large else 1)
                except Exception as e:  # noqa: BLE001 - report and go on
                    res["notes"].append(f"{key}: {type(e).__name__}: {str(e).strip()[:120]}")
            if "eager" in outs and "triton" in outs:
                res["err"] = _max_rel_err(outs["triton"], outs["eager"])
            del outs, impls, step
        except Exception as e:  # noqa: BLE001
            res["notes"].append(f"{type(e).__name__}: {str(e).strip()[:120]}")
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        results.append(res)
        log(res)
    return results


def _cell(x, width, prec, suffix=""):
    return (f"{x:.{prec}f}{suffix}" if x is not None else "-").rjust(width)


def _bench_row(r, copy_gbs):
    """(table line and notes, goal or None) of one result."""
    t, err, goal = r["t"], r.get("err"), None
    e, c, tri = (t.get(k) for k in ("eager", "compile", "triton"))
    sp = [None if x is None or tri is None else x / tri for x in (e, c)]
    if r["large"]:
        gbs = None if tri is None else r["bytes"] / tri / 1e6
        pct = gbs and 100 * gbs / copy_gbs
        extra = _cell(gbs, 8, 0) + _cell(pct, 8, 0)
        if r["name"].startswith("loss") and None not in (pct, sp[1]):
            goal = (f"{pct:.0f} % of copy, {sp[1]:.2f}x compile", pct >= 80 and sp[1] >= 1.3)
        elif r["name"].startswith("dec") and sp[0] is not None:
            goal = (f"{sp[0]:.2f}x eager", sp[0] >= 2)
    else:
        extra = ""
    wall = "/".join(
        _cell(r["wall"].get(k), 0, 2 if r["large"] else 0) for k in ("eager", "compile", "triton")
    )
    prec = 3 if r["large"] else 1
    line = (
        f"{r['name']:<40}{_cell(e, 9, prec)}{_cell(c, 9, prec)}{_cell(tri, 9, prec)}"
        f"{_cell(sp[0], 9, 2, 'x')}{_cell(sp[1], 8, 2, 'x')}{wall:>18}{extra:>16}"
        f"{'-' if err is None else f'{err:.1e}':>9}"
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
        for r in (r for r in results if r["large"] == large):
            text, goal = _bench_row(r, copy_gbs)
            lines.append(text)
            if goal:
                goals.append(f"  {r['name']}: {goal[0]}: {'met' if goal[1] else 'MISSED'}")
    lines.append("\ngoals (large shapes): loss >= 80 % of copy, >= 1.3x compile; DEC >= 2x eager")
    return "\n".join(lines + goals)


def _bench(quick=False, only=None):
    if not torch.cuda.is_available():
        print("kernels.py --bench needs a CUDA device; none is available here.")
        sys.exit(2)
    if not _HAS_TRITON:
        print("kernels.py --bench needs triton; it does not import here.")
        sys.exit(2)
    from triton.testing import do_bench_cudagraph

    # pinned: eager and compiled GEMMs in full fp32, as accurate as the kernels' 3xTF32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")

    def graph_us(fn):  # at least ~25 replays, however long one takes
        est = wall_us(fn, n=3) / 1e3
        return 1e3 * do_bench_cudagraph(fn, rep=max(50, 25 * est), return_mode="median")

    def wall_us(fn, n=100):
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        return 1e6 * (time.perf_counter() - t0) / n

    def compile_fn(f):  # a fresh compile per shape: no recompiles or dynamic shapes timed
        torch._dynamo.reset()
        return torch.compile(f, dynamic=False)

    dev = torch.device("cuda")
    torch.manual_seed(0)
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)  # 1 GiB: far beyond L2
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() / graph_us(lambda: dst.copy_(src)) / 1e3
    del src, dst
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
    print(
        f"check_trusted (masked_pseudo_label_loss's check=True, one aminmax + sync): "
        f"{wall_us(lambda: check_trusted(trusted, C)):.0f} us wall per call",
        flush=True,
    )
    cases = [c for c in _BENCH_CASES if (c[4] or not quick) and only in (None, c[0])]
    print("rows as they finish (columns as in the tables at the end):", flush=True)
    timers = types.SimpleNamespace(graph=graph_us, wall=wall_us)
    results = _bench_run(
        cases, dev, timers, compile_fn, log=lambda r: print(_bench_row(r, copy_gbs)[0], flush=True)
    )
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
