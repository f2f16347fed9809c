"""The functional API: BerDiff's operations in paper time, validated, backend-dispatched.

Time is the paper's: ``t`` is a LongTensor of shape (B,) with values 1..T (``s``: 0 <= s < t),
one per sample, on the masks' device. Masks have shape (B, ...) with any trailing dims.

Two families:
- the mathematics as probabilities (``theta_post``, ``calibrate``, ``ddim_prob``, ``loss_terms``):
  always the dtype-generic reference, for analysis and tests;
- the fused ops (``q_sample``, ``init_noise``, ``ddpm_step``, ``ddim_step``, ``predict_y0``,
  ``loss``): one call each, same signature on every backend, random draws from the shared
  Philox stream keyed by (seed, offset). ``backend=None`` picks automatically (see
  ``berdiff_fast.backends``); the ``BERDIFF_BACKEND`` environment variable overrides that.
  Float outputs are float64 when an input is float64, else float32; the torch and C++ backends
  then compute in float64 too, the Triton kernels always in float32.
"""
from __future__ import annotations

import torch

from . import _checks as check
from . import backends, reference
from .backends import compute_dtype
from .schedule import NoiseSchedule


def _schedule(sched) -> NoiseSchedule:
    if not isinstance(sched, NoiseSchedule):
        raise ValueError(f"sched: expected a NoiseSchedule, got {type(sched).__name__}")
    return sched


def _masks(y_t, t, sched, **others):
    """Validate y_t (B, ...) binary, t (B,) in 1..T, and ``others`` of the same shape/device."""
    check.tensor("y_t", y_t, min_ndim=1)
    for name, x in others.items():
        check.tensor(name, x)
    check.same_shape(y_t=y_t, **others)
    check.same_device(y_t=y_t, **others)
    _mask("y_t", y_t)
    return check.timesteps("t", t, y_t.shape[0], _schedule(sched).T, y_t.device)


def _mask(name: str, y: torch.Tensor) -> None:
    check.dtype(f"{name}.dtype", y.dtype, check.MASK_DTYPES)
    check.binary(name, y)


def _logits(logits: torch.Tensor, *, finite: bool = True) -> None:
    check.dtype("logits.dtype", logits.dtype, check.LOGIT_DTYPES)
    if finite:  # a full read and a synchronisation: the training loss skips it
        check.finite("logits", logits)


# --- the mathematics, as probabilities -------------------------------------------------------

def theta_post(y_t: torch.Tensor, y0: torch.Tensor, t: torch.Tensor, sched: NoiseSchedule) -> torch.Tensor:
    """Eq. 4: P(y_{t-1} = 1 | y_t, y_0); y_0 may be a soft probability map."""
    t = _masks(y_t, t, sched, y0=y0)
    check.probability("y0", y0)
    cd = compute_dtype(y_t, y0)
    a_t, bh_t, _, _ = sched.gather(t, y_t.ndim, cd)
    _, _, ab_prev, flip_prev = sched.gather(t - 1, y_t.ndim, cd)
    return reference.theta_post(y_t.to(cd), y0.to(cd), a_t, bh_t, ab_prev, flip_prev)


def calibrate(y_t: torch.Tensor, eps_prob: torch.Tensor, t: torch.Tensor, sched: NoiseSchedule) -> torch.Tensor:
    """Eq. 7: mu_hat = theta_post(y_t, |y_t - eps_hat|) from the flip probability eps_hat."""
    t = _masks(y_t, t, sched, eps_prob=eps_prob)
    check.probability("eps_prob", eps_prob)
    cd = compute_dtype(y_t, eps_prob)
    a_t, bh_t, _, _ = sched.gather(t, y_t.ndim, cd)
    _, _, ab_prev, flip_prev = sched.gather(t - 1, y_t.ndim, cd)
    return reference.calibrate(y_t.to(cd), eps_prob.to(cd), a_t, bh_t, ab_prev, flip_prev)


def ddim_prob(y_t, eps_prob, t, s, sched: NoiseSchedule, eta: float = 1.0) -> torch.Tensor:
    """Algorithm 2, DDIM: the Bernoulli parameter of y_s given y_t and eps_hat, for s < t."""
    t = _masks(y_t, t, sched, eps_prob=eps_prob)
    s = _jump_target(s, t, sched)
    check.probability("eps_prob", eps_prob)
    eta = check.eta(eta)
    cd = compute_dtype(y_t, eps_prob)
    _, _, ab_t, flip_t = sched.gather(t, y_t.ndim, cd)
    _, _, ab_s, flip_s = sched.gather(s, y_t.ndim, cd)
    y0_hat = reference.predict_y0(y_t.to(cd), eps_prob.to(cd))
    return reference.ddim_prob(y_t.to(cd), y0_hat, ab_t, flip_t, ab_s, flip_s, eta)


def loss_terms(logits, y_t, y0, t, sched: NoiseSchedule) -> dict[str, torch.Tensor]:
    """Per-sample ``kl`` (decoder NLL where t = 1), ``bce`` and ``loss``, each (B,), in bits."""
    t = _masks(y_t, t, sched, y0=y0, logits=logits)
    check.binary("y0", y0)
    _logits(logits)
    cd = compute_dtype(logits, y_t, y0)
    a_t, bh_t, _, _ = sched.gather(t, y_t.ndim, cd)
    _, _, ab_prev, flip_prev = sched.gather(t - 1, y_t.ndim, cd)
    return reference.loss_terms(logits.to(cd), y_t.to(cd), y0.to(cd), t == 1, a_t, bh_t, ab_prev, flip_prev)


def _jump_target(s, t, sched):
    s = check.timesteps("s", s, t.shape[0], sched.T, t.device, low=0)
    if not check.is_compiling() and not bool((s < t).all()):
        raise ValueError("s: every s must be smaller than its t (a DDIM jump goes back in time)")
    return s


# --- the fused ops ---------------------------------------------------------------------------

def q_sample(y0, t, sched: NoiseSchedule, seed, offset=0, *, backend: str | None = None):
    """Algorithm 1: eps ~ B((1 - alpha_bar_t) / 2), y_t = y_0 XOR eps. Returns (y_t, eps) in y0's dtype."""
    check.tensor("y0", y0, min_ndim=1)
    _mask("y0", y0)
    t = check.timesteps("t", t, y0.shape[0], _schedule(sched).T, y0.device)
    y0 = y0.contiguous()
    return backends.resolve(backend, y0.device).q_sample(
        y0, t, sched, check.rng_key("seed", seed, y0.device), check.rng_key("offset", offset, y0.device))


def init_noise(shape, seed, offset=0, *, device="cpu", dtype=torch.float32, backend: str | None = None):
    """The start of sampling, y_T ~ B(1/2), as a tensor of ``shape`` and ``dtype``."""
    shape = tuple(shape)
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"shape: expected non-negative ints, got {shape}")
    device = check.canonical_device(device)
    check.dtype("dtype", dtype, check.MASK_DTYPES)
    return backends.resolve(backend, device).init_noise(
        shape, check.rng_key("seed", seed, device), check.rng_key("offset", offset, device), device, dtype)


def predict_y0(logits, y_t, *, backend: str | None = None):
    """Eq. 7, inner part: y0_hat = |y_t - sigmoid(logits)|, float32 (float64 for float64 logits)."""
    check.tensor("logits", logits, min_ndim=1)
    check.tensor("y_t", y_t)
    check.same_shape(logits=logits, y_t=y_t)
    check.same_device(logits=logits, y_t=y_t)
    _mask("y_t", y_t)
    _logits(logits)
    return backends.resolve(backend, y_t.device).predict_y0(logits.contiguous(), y_t.contiguous())


def ddpm_step(logits, y_t, t, sched: NoiseSchedule, seed, offset, *, return_y0: bool = False,
              backend: str | None = None):
    """Algorithm 2, DDPM: y_{t-1} ~ B(calibrate(y_t, sigmoid(logits))), in y_t's dtype.

    With ``return_y0`` also returns y0_hat = |y_t - sigmoid(logits)| (the last step's output).
    """
    t = _masks(y_t, t, sched, logits=logits)
    _logits(logits)
    dev = y_t.device
    return backends.resolve(backend, dev).ddpm_step(
        logits.contiguous(), y_t.contiguous(), t, sched,
        check.rng_key("seed", seed, dev), check.rng_key("offset", offset, dev), bool(return_y0))


def ddim_step(logits, y_t, t, s, sched: NoiseSchedule, seed, offset, eta: float = 1.0, *,
              return_y0: bool = False, backend: str | None = None):
    """Algorithm 2, DDIM: y_s ~ B(ddim_prob(y_t, sigmoid(logits))) for s < t, in y_t's dtype."""
    t = _masks(y_t, t, sched, logits=logits)
    s = _jump_target(s, t, sched)
    eta = check.eta(eta)
    _logits(logits)
    dev = y_t.device
    return backends.resolve(backend, dev).ddim_step(
        logits.contiguous(), y_t.contiguous(), t, s, sched,
        check.rng_key("seed", seed, dev), check.rng_key("offset", offset, dev), eta, bool(return_y0))


def loss(logits, y_t, y0, t, sched: NoiseSchedule, *, backend: str | None = None) -> torch.Tensor:
    """The training loss (KL or decoder NLL, plus BCE), per sample (B,), in bits; differentiable in logits."""
    t = _masks(y_t, t, sched, y0=y0, logits=logits)
    _mask("y0", y0)
    _logits(logits, finite=False)  # NaN logits give a NaN loss
    return backends.resolve(backend, y_t.device).loss(
        logits.contiguous(), y_t.contiguous(), y0.contiguous(), t, sched)
