"""The ``cpu`` and ``cuda`` backends: the C++ and CUDA kernels of csrc/, as torch.ops.berdiff.

``berdiff_fast._C`` holds the op schemas and the CPU kernels; ``berdiff_fast._C_cuda`` (built on
CUDA machines) adds the CUDA kernels. Both are optional: without them (``BERDIFF_NO_EXT=1`` at
install, or a build for another torch) this module warns once and reports itself unavailable,
and the package runs on its torch and Triton backends.

The ops are registered here for torch.compile and torch.library.opcheck: a fake (meta) function
for each, and the loss's derivative (the C++ ``loss_backward`` op) through register_autograd.
Seeds and offsets given as Python ints travel as one-element CPU int64 tensors (read on the
host); int64 tensors on the data's device are read by the CUDA kernels themselves, so a
captured CUDA graph draws fresh numbers after the caller advances them.
"""
from __future__ import annotations

import warnings

import torch

from . import compute_dtype

try:
    from .. import _C  # noqa: F401  (loading it registers torch.ops.berdiff and the CPU kernels)
except ImportError as exc:  # not built, or built against another torch
    _C = None
    warnings.warn(
        "berdiff_fast: the C++ extension (berdiff_fast._C) is not available, so the 'cpu' and "
        f"'cuda' backends are off and the torch/triton backends are used instead ({exc}). "
        "To build it: pip install --no-build-isolation -e . (with torch installed first; "
        "BERDIFF_NO_EXT=1 skips it).",
        RuntimeWarning,
        stacklevel=2,
    )

if _C is not None and torch.version.cuda is not None:
    try:
        from .. import _C_cuda  # noqa: F401  (the CUDA kernels of the same ops)
    except ImportError:  # built on a machine without CUDA: the cpu backend still works
        _C_cuda = None

_OPS = "berdiff"


def is_available(device: torch.device) -> bool:
    if _C is None:
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
            f"{_OPS}::q_sample", "CUDA")
    return False


def _rng_key(value) -> torch.Tensor:
    """A seed or offset as the ops take it: a one-element int64 tensor (an int wraps mod 2**64)."""
    if isinstance(value, torch.Tensor):
        return value
    value = int(value) % 2**64
    return torch.tensor(value - 2**64 if value >= 2**63 else value, dtype=torch.int64)


# --- the backend contract (berdiff_fast.backends) ---------------------------------------------

def q_sample(y0, t, sched, seed, offset):
    table = sched.table(y0.device, compute_dtype(y0))
    y_t, eps = torch.ops.berdiff.q_sample(y0, t, table, _rng_key(seed), _rng_key(offset))
    return y_t, eps


def init_noise(shape, seed, offset, device, dtype):
    out = torch.empty(shape, dtype=dtype, device=device)
    torch.ops.berdiff.init_noise_(out, _rng_key(seed), _rng_key(offset))
    return out


def predict_y0(logits, y_t):
    return torch.ops.berdiff.predict_y0(logits, y_t)


def ddpm_step(logits, y_t, t, sched, seed, offset, return_y0):
    table = sched.table(y_t.device, compute_dtype(logits, y_t))
    y, y0_hat = torch.ops.berdiff.ddpm_step(logits, y_t, t, table, _rng_key(seed), _rng_key(offset), return_y0)
    return (y, y0_hat) if return_y0 else y


def ddim_step(logits, y_t, t, s, sched, seed, offset, eta, return_y0):
    table = sched.table(y_t.device, compute_dtype(logits, y_t))
    y, y0_hat = torch.ops.berdiff.ddim_step(logits, y_t, t, s, table, _rng_key(seed), _rng_key(offset),
                                            float(eta), return_y0)
    return (y, y0_hat) if return_y0 else y


def loss(logits, y_t, y0, t, sched):
    table = sched.table(y_t.device, compute_dtype(logits, y_t, y0))
    return torch.ops.berdiff.loss(logits, y_t, y0, t, table)


# --- fakes and autograd -----------------------------------------------------------------------

def _register() -> None:
    lib = _OPS

    @torch.library.register_fake(f"{lib}::q_sample")
    def _q_sample_fake(y0, t, table, seed, offset):
        return y0.new_empty(y0.shape), y0.new_empty(y0.shape)

    @torch.library.register_fake(f"{lib}::init_noise_")
    def _init_noise_fake(out, seed, offset):
        return None

    def _step_fake(logits, y_t, return_y0):
        cd = compute_dtype(logits, y_t)
        return y_t.new_empty(y_t.shape), y_t.new_empty(y_t.shape if return_y0 else (0,), dtype=cd)

    @torch.library.register_fake(f"{lib}::ddpm_step")
    def _ddpm_fake(logits, y_t, t, table, seed, offset, return_y0):
        return _step_fake(logits, y_t, return_y0)

    @torch.library.register_fake(f"{lib}::ddim_step")
    def _ddim_fake(logits, y_t, t, s, table, seed, offset, eta, return_y0):
        return _step_fake(logits, y_t, return_y0)

    @torch.library.register_fake(f"{lib}::predict_y0")
    def _predict_y0_fake(logits, y_t):
        return y_t.new_empty(y_t.shape, dtype=compute_dtype(logits, y_t))

    @torch.library.register_fake(f"{lib}::loss")
    def _loss_fake(logits, y_t, y0, t, table):
        return logits.new_empty((logits.shape[0],), dtype=compute_dtype(logits, y_t, y0))

    @torch.library.register_fake(f"{lib}::loss_backward")
    def _loss_backward_fake(grad, logits, y_t, y0, t, table):
        return logits.new_empty(logits.shape)

    def _loss_setup_context(ctx, inputs, output):
        logits, y_t, y0, t, table = inputs
        ctx.save_for_backward(logits, y_t, y0, t, table)

    def _loss_backward(ctx, grad):
        logits, y_t, y0, t, table = ctx.saved_tensors
        dlogits = torch.ops.berdiff.loss_backward(grad, logits, y_t, y0, t, table)
        return dlogits, None, None, None, None

    torch.library.register_autograd(f"{lib}::loss", _loss_backward, setup_context=_loss_setup_context)


if _C is not None:
    _register()
