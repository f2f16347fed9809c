"""Noising and the start of sampling: q_sample (Algorithm 1) and y_T ~ B(1/2), one launch each."""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from berdiff_fast.schedule import COL_FLIP

from ._common import (BLOCK, NUM_WARPS, define_op, key_arg, launch, load_key, load_mask,
                      per_sample_grid, sample_block, split_key, store_mask, uniform)


@triton.jit(do_not_specialize=["seed", "offset"])
def _q_sample_kernel(
    y0_ptr,  # [B, N] binary mask, any dtype
    t_ptr,  # [B] int64, paper time 1..T
    table_ptr,  # [T + 1, 4] float32 schedule table (COL_FLIP = (1 - alpha_bar_t) / 2)
    yt_ptr,  # [B, N] out, y0's dtype
    eps_ptr,  # [B, N] out, y0's dtype
    seed, offset,  # int64 scalars, or pointers to them (SEED_IN_MEM / OFFSET_IN_MEM)
    N,  # elements per sample
    COL_FLIP: tl.constexpr,
    SEED_IN_MEM: tl.constexpr, OFFSET_IN_MEM: tl.constexpr, BLOCK: tl.constexpr,
):
    """Eq. 3 reparameterised (Algorithm 1): eps ~ B((1 - alpha_bar_t) / 2), y_t = y_0 XOR eps.

    The draw is eps = (u < flip_t) with u = tl.rand(seed, offset + i) for flat index i.
    """
    b, idx, m = sample_block(N, BLOCK)
    t = tl.load(t_ptr + b)
    flip_t = tl.load(table_ptr + t * 4 + COL_FLIP)
    s, o = load_key(seed, offset, SEED_IN_MEM, OFFSET_IN_MEM)
    eps = uniform(s, o, idx) < flip_t
    y0 = load_mask(y0_ptr, idx, m)
    store_mask(eps_ptr, idx, eps, m)
    store_mask(yt_ptr, idx, y0 ^ eps, m)


@triton.jit(do_not_specialize=["seed", "offset"])
def _init_noise_kernel(
    y_ptr,  # [numel] out, any mask dtype
    seed, offset,
    numel,
    SEED_IN_MEM: tl.constexpr, OFFSET_IN_MEM: tl.constexpr, BLOCK: tl.constexpr,
):
    """The start of sampling (Algorithm 2): y_T ~ B(1/2), drawn as u < 0.5."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = idx < numel
    s, o = load_key(seed, offset, SEED_IN_MEM, OFFSET_IN_MEM)
    store_mask(y_ptr, idx, uniform(s, o, idx) < 0.5, m)


# --- launchers and registration ---------------------------------------------------------------

def _q_sample_fake(y0, t, table, seed, offset, seed_t, offset_t):
    return torch.empty_like(y0), torch.empty_like(y0)


@define_op("q_sample", _q_sample_fake)
def q_sample_op(y0: torch.Tensor, t: torch.Tensor, table: torch.Tensor, seed: int, offset: int,
                seed_t: Optional[torch.Tensor], offset_t: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    y_t, eps = torch.empty_like(y0), torch.empty_like(y0)
    batch = y0.shape[0]
    n = y0.numel() // batch if batch else 0
    if y0.numel() == 0:
        return y_t, eps
    seed_arg, seed_in_mem = key_arg(seed, seed_t)
    offset_arg, offset_in_mem = key_arg(offset, offset_t)
    launch(_q_sample_kernel)[per_sample_grid(batch, n)](
        y0, t, table, y_t, eps, seed_arg, offset_arg, n, COL_FLIP=COL_FLIP,
        SEED_IN_MEM=seed_in_mem, OFFSET_IN_MEM=offset_in_mem, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return y_t, eps


def _init_noise_fake(shape, dtype, device, seed, offset, seed_t, offset_t):
    return torch.empty(shape, dtype=dtype, device=device)


@define_op("init_noise", _init_noise_fake)
def init_noise_op(shape: list[int], dtype: torch.dtype, device: torch.device, seed: int, offset: int,
                  seed_t: Optional[torch.Tensor], offset_t: Optional[torch.Tensor]) -> torch.Tensor:
    y = torch.empty(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    if numel == 0:
        return y
    seed_arg, seed_in_mem = key_arg(seed, seed_t)
    offset_arg, offset_in_mem = key_arg(offset, offset_t)
    launch(_init_noise_kernel)[(triton.cdiv(numel, BLOCK),)](
        y, seed_arg, offset_arg, numel,
        SEED_IN_MEM=seed_in_mem, OFFSET_IN_MEM=offset_in_mem, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return y


def q_sample(y0: torch.Tensor, t: torch.Tensor, table: torch.Tensor, seed, offset):
    """(y_t, eps) in y0's dtype; seed/offset ints or one-element int64 tensors on y0's device."""
    seed, seed_t = split_key(seed)
    offset, offset_t = split_key(offset)
    return q_sample_op(y0, t.contiguous(), table, seed, offset, seed_t, offset_t)


def init_noise(shape, seed, offset, device, dtype):
    seed, seed_t = split_key(seed)
    offset, offset_t = split_key(offset)
    return init_noise_op(list(shape), dtype, torch.device(device), seed, offset, seed_t, offset_t)
