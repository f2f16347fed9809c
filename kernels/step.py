"""One sampling step from the U-Net's logits, one launch: DDPM (calibration, Eq. 7, and the
posterior, Eq. 4) or DDIM (Algorithm 2), then the Bernoulli draw; optionally the y0_hat map.
Also predict_y0 alone (Eq. 7, inner part)."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from berdiff_fast.backends import compute_dtype
from berdiff_fast.schedule import COL_ALPHA, COL_ALPHA_BAR, COL_BETA_HALF, COL_FLIP

from ._common import (BLOCK, NUM_WARPS, define_op, key_arg, launch, load_key, load_mask, per_sample_grid,
                      sample_block, sigmoid_pair, split_key, store_mask, uniform)


@triton.jit(do_not_specialize=["seed", "offset"])
def _step_kernel(
    logits_ptr,  # [B, N] float32/bfloat16/float16/float64, eps_hat = sigmoid(logits)
    yt_ptr,  # [B, N] binary mask y_t, any dtype
    t_ptr,  # [B] int64, paper time 1..T
    s_ptr,  # [B] int64, DDIM target 0 <= s < t (unused for DDPM, which goes to t - 1)
    table_ptr,  # [T + 1, 4] float32 schedule table
    y_out_ptr,  # [B, N] out: y_{t-1} or y_s, y_t's dtype
    y0_out_ptr,  # [B, N] out: y0_hat, float32/float64 (only when WRITE_Y0)
    eta,  # DDIM stochasticity in [0, 1]
    seed, offset,  # int64 scalars, or pointers to them (SEED_IN_MEM / OFFSET_IN_MEM)
    N,  # elements per sample
    COL_ALPHA: tl.constexpr, COL_BETA_HALF: tl.constexpr, COL_ALPHA_BAR: tl.constexpr,
    COL_FLIP: tl.constexpr,
    IS_DDIM: tl.constexpr, WRITE_Y0: tl.constexpr,
    SEED_IN_MEM: tl.constexpr, OFFSET_IN_MEM: tl.constexpr, BLOCK: tl.constexpr,
):
    """y_next = (u < p), u = tl.rand(seed, offset + i), with

    y0_hat = |y_t - sigmoid(l)|  (Eq. 7; taken as sigmoid(-l) where y_t = 1, exact in both tails)
    DDPM (s = t - 1), p = mu_hat = theta_post(y_t, y0_hat) (Eqs. 4, 7):
        n_k = [alpha_t [1 - y_t, y_t] + beta_t / 2]_k * [alpha_bar_s [1 - y0_hat, y0_hat] + flip_s]_k,
        p = n_1 / (n_0 + n_1)
    DDIM (Algorithm 2), sigma = eta * flip_s / flip_t:
        p = clamp(sigma y_t + (alpha_bar_s - sigma alpha_bar_t) y0_hat + (flip_s - flip_t sigma), 0, 1)
    where flip = (1 - alpha_bar) / 2.
    """
    b, idx, m = sample_block(N, BLOCK)
    t = tl.load(t_ptr + b)
    if IS_DDIM:
        s = tl.load(s_ptr + b)
    else:
        s = t - 1
    ab_s = tl.load(table_ptr + s * 4 + COL_ALPHA_BAR)
    flip_s = tl.load(table_ptr + s * 4 + COL_FLIP)

    yt = load_mask(yt_ptr, idx, m)
    l = tl.load(logits_ptr + idx, mask=m, other=0.0).to(tl.float32)
    e1, e0, _ = sigmoid_pair(l)
    y0_hat = tl.where(yt, e0, e1)
    y0_hat_c = tl.where(yt, e1, e0)  # 1 - y0_hat
    ytf = yt.to(tl.float32)
    if IS_DDIM:
        ab_t = tl.load(table_ptr + t * 4 + COL_ALPHA_BAR)
        flip_t = tl.load(table_ptr + t * 4 + COL_FLIP)
        sigma = eta * flip_s / flip_t
        p = sigma * ytf + (ab_s - sigma * ab_t) * y0_hat + (flip_s - flip_t * sigma)
        p = tl.minimum(tl.maximum(p, 0.0), 1.0)
    else:
        a_t = tl.load(table_ptr + t * 4 + COL_ALPHA)
        bh_t = tl.load(table_ptr + t * 4 + COL_BETA_HALF)
        n0 = (a_t * (1.0 - ytf) + bh_t) * (ab_s * y0_hat_c + flip_s)
        n1 = (a_t * ytf + bh_t) * (ab_s * y0_hat + flip_s)
        p = n1 / (n0 + n1)

    s_key, o_key = load_key(seed, offset, SEED_IN_MEM, OFFSET_IN_MEM)
    store_mask(y_out_ptr, idx, uniform(s_key, o_key, idx) < p, m)
    if WRITE_Y0:
        tl.store(y0_out_ptr + idx, y0_hat.to(y0_out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _predict_y0_kernel(
    logits_ptr,  # [numel] float32/bfloat16/float16/float64
    yt_ptr,  # [numel] binary mask, any dtype
    out_ptr,  # [numel] out, float32/float64
    numel,
    BLOCK: tl.constexpr,
):
    """Eq. 7, inner part: y0_hat = |y_t - sigmoid(l)|, i.e. sigmoid(-l) where y_t = 1, else sigmoid(l)."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = idx < numel
    l = tl.load(logits_ptr + idx, mask=m, other=0.0).to(tl.float32)
    e1, e0, _ = sigmoid_pair(l)
    y0_hat = tl.where(load_mask(yt_ptr, idx, m), e0, e1)
    tl.store(out_ptr + idx, y0_hat.to(out_ptr.dtype.element_ty), mask=m)


# --- launchers and registration ---------------------------------------------------------------

def _outputs(logits, y_t, return_y0):
    y0_shape = y_t.shape if return_y0 else (0,)
    return torch.empty_like(y_t), y_t.new_empty(y0_shape, dtype=compute_dtype(logits, y_t))


def _launch_step(logits, y_t, t, s, table, eta, seed, offset, seed_t, offset_t, return_y0, is_ddim):
    y_next, y0_hat = _outputs(logits, y_t, return_y0)
    batch = y_t.shape[0]
    if y_t.numel() == 0:
        return y_next, y0_hat
    n = y_t.numel() // batch
    seed_arg, seed_in_mem = key_arg(seed, seed_t)
    offset_arg, offset_in_mem = key_arg(offset, offset_t)
    launch(_step_kernel)[per_sample_grid(batch, n)](
        logits, y_t, t, s, table, y_next, y0_hat, eta, seed_arg, offset_arg, n,
        COL_ALPHA=COL_ALPHA, COL_BETA_HALF=COL_BETA_HALF, COL_ALPHA_BAR=COL_ALPHA_BAR, COL_FLIP=COL_FLIP,
        IS_DDIM=is_ddim, WRITE_Y0=return_y0, SEED_IN_MEM=seed_in_mem, OFFSET_IN_MEM=offset_in_mem,
        BLOCK=BLOCK, num_warps=NUM_WARPS)
    return y_next, y0_hat


def _ddpm_fake(logits, y_t, t, table, seed, offset, seed_t, offset_t, return_y0):
    return _outputs(logits, y_t, return_y0)


@define_op("ddpm_step", _ddpm_fake)
def ddpm_step_op(logits: torch.Tensor, y_t: torch.Tensor, t: torch.Tensor, table: torch.Tensor,
                 seed: int, offset: int, seed_t: Optional[torch.Tensor], offset_t: Optional[torch.Tensor],
                 return_y0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y_{t-1}, y0_hat); y0_hat is an empty (0,) tensor unless ``return_y0``."""
    return _launch_step(logits, y_t, t, t, table, 0.0, seed, offset, seed_t, offset_t, return_y0, False)


def _ddim_fake(logits, y_t, t, s, table, eta, seed, offset, seed_t, offset_t, return_y0):
    return _outputs(logits, y_t, return_y0)


@define_op("ddim_step", _ddim_fake)
def ddim_step_op(logits: torch.Tensor, y_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
                 table: torch.Tensor, eta: float, seed: int, offset: int, seed_t: Optional[torch.Tensor],
                 offset_t: Optional[torch.Tensor], return_y0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y_s, y0_hat); y0_hat is an empty (0,) tensor unless ``return_y0``."""
    return _launch_step(logits, y_t, t, s, table, eta, seed, offset, seed_t, offset_t, return_y0, True)


def _predict_y0_fake(logits, y_t):
    return torch.empty_like(logits, dtype=compute_dtype(logits, y_t))


@define_op("predict_y0", _predict_y0_fake)
def predict_y0_op(logits: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(logits, dtype=compute_dtype(logits, y_t))
    numel = out.numel()
    if numel:
        launch(_predict_y0_kernel)[(triton.cdiv(numel, BLOCK),)](
            logits, y_t, out, numel, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


# --- autograd: y0_hat is differentiable in the logits; a drawn mask is piecewise constant in
# them (derivative 0 almost everywhere), so only y0_hat's gradient flows back.

def _y0_hat_grad(grad, logits, y_t):
    """d y0_hat / d l = (1 - 2 y_t) sigmoid(l) sigmoid(-l), times the upstream gradient."""
    l = logits.to(grad.dtype)
    sign = 1.0 - 2.0 * (y_t != 0).to(grad.dtype)
    return (grad * sign * torch.sigmoid(l) * torch.sigmoid(-l)).to(logits.dtype)


def _save_logits_and_mask(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])


def _predict_y0_backward(ctx, grad):
    logits, y_t = ctx.saved_tensors
    return _y0_hat_grad(grad, logits, y_t), None


def _step_backward(n_inputs):
    def backward(ctx, grad_mask, grad_y0_hat):
        logits, y_t = ctx.saved_tensors
        dlogits = None
        if grad_y0_hat is not None and grad_y0_hat.numel() == logits.numel() and logits.numel():
            dlogits = _y0_hat_grad(grad_y0_hat, logits, y_t)
        return (dlogits,) + (None,) * (n_inputs - 1)
    return backward


predict_y0_op.register_autograd(_predict_y0_backward, setup_context=_save_logits_and_mask)
ddpm_step_op.register_autograd(_step_backward(9), setup_context=_save_logits_and_mask)
ddim_step_op.register_autograd(_step_backward(11), setup_context=_save_logits_and_mask)


def ddpm_step(logits, y_t, t, table, seed, offset, return_y0):
    seed, seed_t = split_key(seed)
    offset, offset_t = split_key(offset)
    y, y0_hat = ddpm_step_op(logits, y_t, t.contiguous(), table, seed, offset, seed_t, offset_t, return_y0)
    return (y, y0_hat) if return_y0 else y


def ddim_step(logits, y_t, t, s, table, seed, offset, eta, return_y0):
    seed, seed_t = split_key(seed)
    offset, offset_t = split_key(offset)
    y, y0_hat = ddim_step_op(logits, y_t, t.contiguous(), s.contiguous(), table, float(eta),
                             seed, offset, seed_t, offset_t, return_y0)
    return (y, y0_hat) if return_y0 else y


def predict_y0(logits, y_t):
    return predict_y0_op(logits, y_t)
