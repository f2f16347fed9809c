"""Philox4x32-10 exactly as Triton's ``tl.rand(seed, offset)`` computes it (DESIGN §3).

Every random draw of the library comes from this one stream: element i of a draw of a
contiguous tensor uses the 64-bit counter ``offset + i`` and the 64-bit key ``seed``; the
first Philox output word is mapped to [0, 1) as Triton's ``uint_to_uniform_float`` does.
The Triton, C++ and CUDA kernels draw the same numbers, so one (seed, offset) gives the same
masks on every backend.

Plain torch int64 arithmetic (no uint32 dtype needed) so it runs on any device and accepts
seeds and offsets held in device tensors, e.g. by a CUDA graph that advances them on replay.
"""
from __future__ import annotations

import torch

PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
N_ROUNDS = 10
# Largest float32 scale with (2**31 - 1) * scale < 1 after rounding: Triton's constant.
UNIFORM_SCALE = 4.6566127342e-10
_M32 = 0xFFFFFFFF


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product a * b for a < 2**32 and 0 <= b < 2**32.

    Splits b into 16-bit halves so no partial product exceeds int64.
    """
    p_lo = a * (b & 0xFFFF)  # < 2**48
    p_hi = a * (b >> 16)  # < 2**48
    mid = ((p_hi & 0xFFFF) << 16) + p_lo  # low 48 bits of the product, < 2**49
    return ((p_hi >> 16) + (mid >> 32)) & _M32, mid & _M32


def philox(seed, counter_lo: torch.Tensor, counter_hi: torch.Tensor) -> torch.Tensor:
    """First output word of Philox4x32-10 for counters (lo, hi, 0, 0) and key (seed_lo, seed_hi).

    Returns an int64 tensor of values in [0, 2**32).
    """
    seed = torch.as_tensor(seed, dtype=torch.int64, device=counter_lo.device)
    k0 = seed & _M32
    k1 = (seed >> 32) & _M32
    c0, c1 = counter_lo, counter_hi
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(N_ROUNDS):
        hi_b, lo_b = _mulhilo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _M32
        k1 = (k1 + PHILOX_KEY_B) & _M32
    return c0


def uint_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """Triton's uint32 -> [0, 1) map: reinterpret as int32, fold negatives with ~x, scale."""
    folded = torch.where(x >= 2**31, _M32 - x, x)  # ~x of the int32 view, as a non-negative int
    # A Python scalar, not a new device tensor: no host-to-device copy inside a CUDA-graph capture.
    return folded.to(torch.float32) * UNIFORM_SCALE


def uniform(seed, offset, n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """n float32 uniforms: element i is ``tl.rand(seed, offset + i)``.

    seed, offset: Python ints or int64 tensors with one element (possibly on a device); the
    64-bit counter wraps modulo 2**64 as an unsigned integer would.
    """
    if device is None:
        device = offset.device if isinstance(offset, torch.Tensor) else (
            seed.device if isinstance(seed, torch.Tensor) else "cpu")
    if isinstance(offset, int):
        offset = offset % 2**64 - (2**64 if offset % 2**64 >= 2**63 else 0)  # to signed int64
    off = torch.as_tensor(offset, dtype=torch.int64, device=device).reshape(())
    if isinstance(seed, int):
        seed = seed % 2**64 - (2**64 if seed % 2**64 >= 2**63 else 0)
    idx = torch.arange(n, dtype=torch.int64, device=device)
    # Split into 32-bit halves before adding so the carry into the high word is exact.
    lo = (off & _M32) + idx
    hi = ((off >> 32) + (lo >> 32)) & _M32
    return uint_to_uniform(philox(seed, lo & _M32, hi))


def uniform_like(t: torch.Tensor, seed, offset) -> torch.Tensor:
    """Uniforms shaped like ``t`` (flat index order of its contiguous layout)."""
    return uniform(seed, offset, t.numel(), device=t.device).view(t.shape)
