"""The ``torch`` backend: the reference mathematics fed the shared Philox uniforms.

Computes in float32 (float64 when the inputs are float64): the oracle that the fused kernels
must reproduce mask for mask.
"""
from __future__ import annotations

import torch

from .. import reference, rng
from . import compute_dtype


def is_available(device: torch.device) -> bool:
    return True


def q_sample(y0, t, sched, seed, offset):
    cd = compute_dtype(y0)
    _, _, _, flip_t = sched.gather(t, y0.ndim, cd)
    y_t, eps = reference.q_sample(y0.to(cd), flip_t, rng.uniform_like(y0, seed, offset))
    return y_t.to(y0.dtype), eps.to(y0.dtype)


def init_noise(shape, seed, offset, device, dtype):
    n = 1
    for d in shape:
        n *= d
    half = torch.tensor(0.5, dtype=torch.float32, device=device)
    return reference.bernoulli(half, rng.uniform(seed, offset, n, device)).view(shape).to(dtype)


def predict_y0(logits, y_t):
    cd = compute_dtype(logits, y_t)
    return reference.predict_y0_from_logits(y_t.to(cd), logits.to(cd))[0]


def ddpm_step(logits, y_t, t, sched, seed, offset, return_y0):
    cd = compute_dtype(logits, y_t)
    a_t, bh_t, _, _ = sched.gather(t, y_t.ndim, cd)
    _, _, ab_prev, flip_prev = sched.gather(t - 1, y_t.ndim, cd)
    yt, l = y_t.to(cd), logits.to(cd)
    y = reference.ddpm_step(l, yt, a_t, bh_t, ab_prev, flip_prev, rng.uniform_like(y_t, seed, offset))
    y = y.to(y_t.dtype)
    return (y, reference.predict_y0_from_logits(yt, l)[0]) if return_y0 else y


def ddim_step(logits, y_t, t, s, sched, seed, offset, eta, return_y0):
    cd = compute_dtype(logits, y_t)
    _, _, ab_t, flip_t = sched.gather(t, y_t.ndim, cd)
    _, _, ab_s, flip_s = sched.gather(s, y_t.ndim, cd)
    yt, l = y_t.to(cd), logits.to(cd)
    y = reference.ddim_step(l, yt, ab_t, flip_t, ab_s, flip_s, eta, rng.uniform_like(y_t, seed, offset))
    y = y.to(y_t.dtype)
    return (y, reference.predict_y0_from_logits(yt, l)[0]) if return_y0 else y


def loss(logits, y_t, y0, t, sched):
    cd = compute_dtype(logits, y_t, y0)
    a_t, bh_t, _, _ = sched.gather(t, logits.ndim, cd)
    _, _, ab_prev, flip_prev = sched.gather(t - 1, logits.ndim, cd)
    return reference.loss_terms(logits.to(cd), y_t.to(cd), y0.to(cd), t == 1,
                                a_t, bh_t, ab_prev, flip_prev)["loss"]
