"""The ``triton`` backend: fused Triton kernels for every Bernoulli op (installed as berdiff_fast.kernels).

Implements the contract of ``berdiff_fast.backends`` (arguments arrive validated and
contiguous). Every op is one launch registered as ``torch.ops.berdiff_triton.*`` (see
``_common`` for the registration route); random draws follow DESIGN §3: element i of an
output uses ``tl.rand(seed, offset + i)``, so masks equal the torch backend's for the same
(seed, offset) up to draws within float rounding of p.

On CPU tensors it runs only under the Triton interpreter (``TRITON_INTERPRET=1``, for tests).
"""
from __future__ import annotations

import os

import torch

from . import loss as _loss
from . import noise as _noise
from . import step as _step
from ._common import INTERPRET

__all__ = ["is_available", "q_sample", "init_noise", "ddpm_step", "ddim_step", "predict_y0", "loss"]


def is_available(device) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    # The kernels were created for the interpreter only if it was on at import time.
    return device.type == "cpu" and INTERPRET and os.environ.get("TRITON_INTERPRET") == "1"


def _table(sched, device):
    return sched.table(device, torch.float32)


def q_sample(y0, t, sched, seed, offset):
    """Algorithm 1: (y_t, eps) in y0's dtype."""
    return _noise.q_sample(y0, t, _table(sched, y0.device), seed, offset)


def init_noise(shape, seed, offset, device, dtype):
    """y_T ~ B(1/2) of ``shape`` and ``dtype``."""
    return _noise.init_noise(shape, seed, offset, device, dtype)


def ddpm_step(logits, y_t, t, sched, seed, offset, return_y0):
    """y_{t-1} ~ B(mu_hat) in y_t's dtype [, y0_hat]."""
    return _step.ddpm_step(logits, y_t, t, _table(sched, y_t.device), seed, offset, return_y0)


def ddim_step(logits, y_t, t, s, sched, seed, offset, eta, return_y0):
    """y_s ~ B(p_DDIM) in y_t's dtype [, y0_hat]."""
    return _step.ddim_step(logits, y_t, t, s, _table(sched, y_t.device), seed, offset, eta, return_y0)


def predict_y0(logits, y_t):
    """y0_hat = |y_t - sigmoid(logits)|: float32, float64 when an input is float64."""
    return _step.predict_y0(logits, y_t)


def loss(logits, y_t, y0, t, sched):
    """Per-sample loss (B,) in bits, differentiable in logits."""
    return _loss.loss(logits, y_t, y0, t, _table(sched, logits.device))
