"""Backends of the fused Bernoulli ops, chosen per call.

Every backend is a module exposing the same six functions, called by
``berdiff_fast.functional`` with arguments already validated (masks contiguous, t and s int64
(B,) on the masks' device, seed/offset ints or one-element int64 tensors on that device):

    q_sample(y0, t, sched, seed, offset) -> (y_t, eps)                 dtype of y0
    init_noise(shape, seed, offset, device, dtype) -> y_T
    ddpm_step(logits, y_t, t, sched, seed, offset, return_y0) -> y_{t-1} [, y0_hat]
    ddim_step(logits, y_t, t, s, sched, seed, offset, eta, return_y0) -> y_s [, y0_hat]
    predict_y0(logits, y_t) -> y0_hat                                  float32 (float64 in, float64 out)
    loss(logits, y_t, y0, t, sched) -> (B,) bits, differentiable in logits

and ``is_available(device) -> bool``. Masks come back in the dtype of the mask they replace.
All draw from the Philox stream of ``berdiff_fast.rng`` (element i uses offset + i).
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("torch", "triton", "cpu", "cuda")
_MODULES = {
    "torch": "berdiff_fast.backends.torch_ref",
    "triton": "berdiff_fast.kernels",
    "cpu": "berdiff_fast.backends.cpp",
    "cuda": "berdiff_fast.backends.cpp",
}
ENV_VAR = "BERDIFF_BACKEND"


def compute_dtype(*xs: torch.Tensor) -> torch.dtype:
    """The dtype of the float outputs (y0_hat, the loss) of every backend: float64 when any input is
    float64, else float32. The torch and C++ backends also compute in it; Triton's kernels compute
    in float32 throughout."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


_loaded: dict[str, ModuleType | None] = {}


def _load(name: str) -> ModuleType | None:
    # Imported once, then looked up: torch.compile can trace a dict lookup but not an import.
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(_MODULES[name])
        except ImportError:
            _loaded[name] = None
    return _loaded[name]


def available(name: str, device: torch.device) -> bool:
    """Whether backend ``name`` can run tensors on ``device`` in this installation."""
    if name == "cpu" and device.type != "cpu" or name == "cuda" and device.type != "cuda":
        return False
    mod = _load(name)
    return mod is not None and bool(mod.is_available(device))


def default(device: torch.device) -> str:
    """The automatic choice: triton on CUDA; on CPU the C++ kernels when built, else torch."""
    order = ("triton", "cuda", "torch") if device.type == "cuda" else ("cpu", "torch")
    return next(n for n in order if available(n, device))


def resolve(backend: str | None, device: torch.device) -> ModuleType:
    """The module for ``backend`` (argument, else $BERDIFF_BACKEND, else automatic) on ``device``."""
    name = backend or os.environ.get(ENV_VAR) or default(device)
    source = "backend" if backend else (ENV_VAR if os.environ.get(ENV_VAR) else "backend")
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {BACKENDS}")
    if not available(name, device):
        raise ValueError(f"{source}: backend {name!r} cannot run tensors on {device} here "
                         f"(available: {[n for n in BACKENDS if available(n, device)]})")
    return _load(name)
