"""Argument validation shared by the public calls: each failure names the argument."""
from __future__ import annotations

import torch


def is_compiling() -> bool:
    # Data-dependent checks (.item(), .all()) would break a torch.compile graph; inside a trace
    # the inputs were already checked by the eager call that set it up.
    return torch.compiler.is_compiling()


def tensor(name: str, x, *, ndim: int | None = None, min_ndim: int | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(x.shape)}")
    if min_ndim is not None and x.ndim < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dimensions, got shape {tuple(x.shape)}")
    return x


LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MASK_DTYPES = (torch.bool, torch.uint8, *LOGIT_DTYPES)  # what every backend stores and loads


def dtype(name: str, value, allowed: tuple[torch.dtype, ...]) -> torch.dtype:
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {', '.join(str(d) for d in allowed)}, got {value}")
    return value


def same_device(**tensors: torch.Tensor) -> None:
    devs = {k: v.device for k, v in tensors.items()}
    if len(set(devs.values())) > 1:
        raise ValueError("tensors on different devices: " + ", ".join(f"{k} on {d}" for k, d in devs.items()))


def same_shape(**tensors: torch.Tensor) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError("shapes must match exactly (nothing is broadcast): "
                         + ", ".join(f"{k} {s}" for k, s in shapes.items()))


def finite(name: str, x: torch.Tensor) -> None:
    if x.is_floating_point() and not is_compiling() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: contains NaN or inf")


def canonical_device(device) -> torch.device:
    """``device`` with its index filled in ("cuda" -> "cuda:<current>"): a tensor's device always
    carries one, so comparisons with it need the same form."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def binary(name: str, y: torch.Tensor) -> None:
    if y.dtype == torch.bool or is_compiling():
        return
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValueError(f"{name}: expected a binary mask (values 0 and 1 only)")


def probability(name: str, p: torch.Tensor) -> None:
    if not is_compiling() and not bool(((p >= 0) & (p <= 1)).all()):
        raise ValueError(f"{name}: expected probabilities in [0, 1]")


def timesteps(name: str, t, batch: int, T: int, device: torch.device, low: int = 1) -> torch.Tensor:
    """A LongTensor of shape (batch,) on ``device`` with values in low..T."""
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}: expected an integer (Long) tensor of shape ({batch},), got "
                         f"{type(t).__name__ if not isinstance(t, torch.Tensor) else t.dtype}")
    if tuple(t.shape) != (batch,):
        raise ValueError(f"{name}: expected shape ({batch},) (one timestep per sample), got {tuple(t.shape)}")
    device = canonical_device(device)
    if t.device != device:
        raise ValueError(f"{name}: on {t.device}, but the masks are on {device}")
    if not is_compiling() and batch and not bool(((t >= low) & (t <= T)).all()):
        raise ValueError(f"{name}: values must lie in {low}..{T} (paper time), got "
                         f"min {int(t.min())}, max {int(t.max())}")
    return t.long()


def eta(value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"eta: expected a number in [0, 1], got {value!r}")
    return float(value)


def rng_key(name: str, value, device: torch.device):
    """A seed or offset: a non-negative Python int, or a one-element int64 tensor on ``device``."""
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected an int or an int64 tensor, got bool")
    if isinstance(value, int):
        if not 0 <= value < 2**64:
            raise ValueError(f"{name}: expected an int in [0, 2**64), got {value}")
        return value
    if isinstance(value, torch.Tensor):
        if value.dtype != torch.int64 or value.numel() != 1:
            raise ValueError(f"{name}: a tensor {name} must be int64 with one element, got "
                             f"{value.dtype} of shape {tuple(value.shape)}")
        device = canonical_device(device)
        if value.device != device:
            raise ValueError(f"{name}: on {value.device}, but the masks are on {device}")
        return value
    raise ValueError(f"{name}: expected an int or an int64 tensor, got {type(value).__name__}")
