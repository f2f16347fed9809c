"""The training loss from logits (Eqs. 8, 9; DESIGN §1), per sample in bits: forward kernel,
backward kernel (dL/dlogits in one pass, recomputed from the inputs), launchers, autograd."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from berdiff_fast.backends import compute_dtype
from berdiff_fast.schedule import COL_ALPHA, COL_ALPHA_BAR, COL_BETA_HALF, COL_FLIP

from ._common import BLOCK, NUM_WARPS, define_op, launch, load_mask, log1p, sample_block, sigmoid_pair

LN2 = math.log(2.0)


@triton.jit
def _loss_terms(logits_ptr, yt_ptr, y0_ptr, t_ptr, table_ptr, N,
                COL_ALPHA: tl.constexpr, COL_BETA_HALF: tl.constexpr, COL_ALPHA_BAR: tl.constexpr,
                COL_FLIP: tl.constexpr, BLOCK: tl.constexpr):
    """Everything the forward and backward kernels share, for this program's block.

    With e1 = sigmoid(l), e0 = sigmoid(-l), y0_hat = y_t ? e0 : e1 (Eq. 7), eps = y_t XOR y_0:
      A_k = [alpha_t [1 - y_t, y_t] + beta_t / 2]_k,
      q: Eq. 4 with y_0, n_k = A_k [alpha_bar_{t-1} [1 - y0_hat, y0_hat] + flip_{t-1}]_k = A_k B_k,
      p = n_1 / (n_0 + n_1) (the calibrated posterior mu_hat), 1 - p = n_0 / (n_0 + n_1).
    """
    b, idx, m = sample_block(N, BLOCK)
    t = tl.load(t_ptr + b)
    a_t = tl.load(table_ptr + t * 4 + COL_ALPHA)
    bh_t = tl.load(table_ptr + t * 4 + COL_BETA_HALF)
    ab_p = tl.load(table_ptr + (t - 1) * 4 + COL_ALPHA_BAR)
    flip_p = tl.load(table_ptr + (t - 1) * 4 + COL_FLIP)
    # At t = 1 the KL branch is discarded (decoder NLL instead); evaluating it at flip = 1/2
    # rather than flip_0 = 0 keeps it free of log(0) and 0/0.
    flip_p = tl.where(t == 1, 0.5, flip_p)

    yt = load_mask(yt_ptr, idx, m)
    y0 = load_mask(y0_ptr, idx, m)
    l = tl.load(logits_ptr + idx, mask=m, other=0.0).to(tl.float32)
    e1, e0, z = sigmoid_pair(l)
    ytf = yt.to(tl.float32)
    epsf = (yt ^ y0).to(tl.float32)

    a0 = a_t * (1.0 - ytf) + bh_t
    a1 = a_t * ytf + bh_t
    y0f = y0.to(tl.float32)
    qn0 = a0 * (ab_p * (1.0 - y0f) + flip_p)
    qn1 = a1 * (ab_p * y0f + flip_p)
    b0 = ab_p * tl.where(yt, e1, e0) + flip_p  # y0_hat_c = 1 - y0_hat
    b1 = ab_p * tl.where(yt, e0, e1) + flip_p
    n0 = a0 * b0
    n1 = a1 * b1
    return b, idx, m, t, l, e1, e0, z, ytf, epsf, ab_p, qn0, qn1, n0, n1, b0, b1


@triton.jit
def _loss_fwd_kernel(
    logits_ptr,  # [B, N] float32/bfloat16/float16/float64
    yt_ptr,  # [B, N] binary mask y_t, any dtype
    y0_ptr,  # [B, N] binary mask y_0, any dtype
    t_ptr,  # [B] int64, paper time 1..T
    table_ptr,  # [T + 1, 4] float32 schedule table
    partial_ptr,  # [B, cdiv(N, BLOCK)] out float32: this block's share of the sample's loss
    N,  # elements per sample
    scale,  # 1 / (N ln 2): pixel mean, in bits
    COL_ALPHA: tl.constexpr, COL_BETA_HALF: tl.constexpr, COL_ALPHA_BAR: tl.constexpr,
    COL_FLIP: tl.constexpr, BLOCK: tl.constexpr,
):
    """L = mean_pixels[KL(B(q) || B(p)) (t > 1) or NLL (t = 1)  +  BCE(l, eps)] / ln 2  (Eqs. 8, 9)

    KL = q log(q / p) + (1 - q) log((1 - q) / (1 - p)), each ratio as one quotient of the
    positive channel products (q = qn_1 / (qn_0 + qn_1), p = n_1 / (n_0 + n_1)); 0 log 0 = 0.
    BCE = softplus(l) - eps l = max(l, 0) + log1p(exp(-|l|)) - eps l.
    The decoder NLL -log B(y_0; y0_hat) at t = 1 equals BCE(l, eps) exactly.
    """
    b, idx, m, t, l, e1, e0, z, ytf, epsf, ab_p, qn0, qn1, n0, n1, b0, b1 = _loss_terms(
        logits_ptr, yt_ptr, y0_ptr, t_ptr, table_ptr, N,
        COL_ALPHA, COL_BETA_HALF, COL_ALPHA_BAR, COL_FLIP, BLOCK)
    bce = tl.maximum(l, 0.0) + log1p(z) - epsf * l
    qd = qn0 + qn1
    d = n0 + n1
    kl1 = tl.where(qn1 > 0, (qn1 / qd) * tl.log((qn1 * d) / (qd * n1)), 0.0)
    kl0 = tl.where(qn0 > 0, (qn0 / qd) * tl.log((qn0 * d) / (qd * n0)), 0.0)
    v = tl.where(t == 1, bce, kl0 + kl1) + bce
    v = tl.where(m, v, 0.0)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(v, axis=0) * scale)


@triton.jit
def _loss_bwd_kernel(
    grad_ptr,  # [B] float32/float64: dOut/dloss per sample
    logits_ptr, yt_ptr, y0_ptr, t_ptr, table_ptr,  # as in the forward kernel
    dlogits_ptr,  # [B, N] out, logits' dtype
    N, scale,
    COL_ALPHA: tl.constexpr, COL_BETA_HALF: tl.constexpr, COL_ALPHA_BAR: tl.constexpr,
    COL_FLIP: tl.constexpr, BLOCK: tl.constexpr,
):
    """dL/dl = grad[b] / (N ln 2) * (dKL/dl (or dNLL/dl at t = 1) + dBCE/dl), where

    dBCE/dl = dNLL/dl = sigmoid(l) - eps,
    dKL/dl = (p - q) * alpha_bar_{t-1} * (1 - 2 y_t) * e1 e0 / (B_0 B_1)
    (dKL/dp = (p - q) / (p (1 - p)), p (1 - p) = n_0 n_1 / D^2, dp/dy0_hat = alpha_bar_{t-1} A_0 A_1 / D^2
    since B_0 + B_1 = 1, dy0_hat/dl = (1 - 2 y_t) e1 e0).
    """
    b, idx, m, t, l, e1, e0, z, ytf, epsf, ab_p, qn0, qn1, n0, n1, b0, b1 = _loss_terms(
        logits_ptr, yt_ptr, y0_ptr, t_ptr, table_ptr, N,
        COL_ALPHA, COL_BETA_HALF, COL_ALPHA_BAR, COL_FLIP, BLOCK)
    dbce = e1 - epsf
    p = n1 / (n0 + n1)
    q = qn1 / (qn0 + qn1)
    dkl = (p - q) * ab_p * (1.0 - 2.0 * ytf) * (e1 * e0) / (b0 * b1)
    g = tl.load(grad_ptr + b).to(tl.float32) * scale
    dl = g * (tl.where(t == 1, dbce, dkl) + dbce)
    tl.store(dlogits_ptr + idx, dl.to(dlogits_ptr.dtype.element_ty), mask=m)


# --- launchers and registration ---------------------------------------------------------------

_COLS = dict(COL_ALPHA=COL_ALPHA, COL_BETA_HALF=COL_BETA_HALF, COL_ALPHA_BAR=COL_ALPHA_BAR, COL_FLIP=COL_FLIP)


def _loss_fake(logits, y_t, y0, t, table):
    return logits.new_empty((logits.shape[0],), dtype=compute_dtype(logits, y_t, y0))


@define_op("loss", _loss_fake)
def loss_op(logits: torch.Tensor, y_t: torch.Tensor, y0: torch.Tensor, t: torch.Tensor,
            table: torch.Tensor) -> torch.Tensor:
    """Per-sample loss (B,) in bits: float32, float64 when an input is float64."""
    dtype = compute_dtype(logits, y_t, y0)
    batch = logits.shape[0]
    if batch == 0:
        return logits.new_empty((0,), dtype=dtype)
    n = logits.numel() // batch
    if n == 0:  # the mean over no pixels, as torch.mean gives it
        return logits.new_full((batch,), math.nan, dtype=dtype)
    nblk = triton.cdiv(n, BLOCK)
    # One partial per block rather than atomics: the loss is the same bits on every run.
    partials = logits.new_empty((batch, nblk), dtype=torch.float32)
    launch(_loss_fwd_kernel)[(batch * nblk,)](
        logits, y_t, y0, t, table, partials, n, 1.0 / (n * LN2), **_COLS, BLOCK=BLOCK,
        num_warps=NUM_WARPS)
    return partials.sum(1, dtype=dtype)


def _loss_backward_fake(grad, logits, y_t, y0, t, table):
    return torch.empty_like(logits)


@define_op("loss_backward", _loss_backward_fake)
def loss_backward_op(grad: torch.Tensor, logits: torch.Tensor, y_t: torch.Tensor, y0: torch.Tensor,
                     t: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """dL/dlogits for the upstream gradient ``grad`` (B,), in logits' dtype."""
    dlogits = torch.empty_like(logits)
    batch = logits.shape[0]
    if logits.numel() == 0:
        return dlogits
    n = logits.numel() // batch
    # The gradient of loss.sum() arrives expanded (stride 0); the kernel reads it densely.
    grad = grad.contiguous()
    launch(_loss_bwd_kernel)[(batch * triton.cdiv(n, BLOCK),)](
        grad, logits, y_t, y0, t, table, dlogits, n, 1.0 / (n * LN2), **_COLS, BLOCK=BLOCK,
        num_warps=NUM_WARPS)
    return dlogits


def _setup_context(ctx, inputs, output):
    logits, y_t, y0, t, table = inputs
    ctx.save_for_backward(logits, y_t, y0, t, table)


def _backward(ctx, grad):
    logits, y_t, y0, t, table = ctx.saved_tensors
    return loss_backward_op(grad, logits, y_t, y0, t, table), None, None, None, None


loss_op.register_autograd(_backward, setup_context=_setup_context)


def loss(logits, y_t, y0, t, table):
    return loss_op(logits, y_t, y0, t.contiguous(), table)
