"""What every Triton op of this package shares: the Philox key, accurate sigmoids, registration.

Registration route (ENVIRONMENT.md, "Triton without a GPU"):
- on a GPU, ``torch.library.triton_op`` with launches through ``wrap_triton``: its body doubles
  as the fake implementation, and Inductor sees the kernel itself (it can call it from the
  compiled graph without going through the dispatcher);
- under the Triton interpreter (``TRITON_INTERPRET=1``, CPU tests) a ``triton_op`` cannot be
  traced by torch.compile (its body would run the interpreter on fake tensors), so the same
  bodies are registered with ``torch.library.custom_op`` plus an explicit ``register_fake``.
Both routes give the same schemas, autograd and results; ``BERDIFF_TRITON_REGISTRATION``
("triton_op" or "custom_op") overrides the automatic choice, e.g. to run the custom_op route on
a GPU if a torch version's triton_op tracing misbehaves.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import triton
import triton.language as tl

NAMESPACE = "berdiff_triton"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
REGISTRATIONS = ("triton_op", "custom_op")
REGISTRATION = os.environ.get("BERDIFF_TRITON_REGISTRATION") or ("custom_op" if INTERPRET else "triton_op")
if REGISTRATION not in REGISTRATIONS:
    raise ValueError(f"BERDIFF_TRITON_REGISTRATION: unknown {REGISTRATION!r}; expected one of {REGISTRATIONS}")
if REGISTRATION == "triton_op" and INTERPRET:
    raise ValueError("BERDIFF_TRITON_REGISTRATION=triton_op cannot run under TRITON_INTERPRET=1 "
                     "(torch.compile cannot trace an interpreted kernel); use custom_op")

# Elements per program. 1024 with 4 warps (8 per thread) keeps every load and store vectorised
# on the GPU; under the interpreter, which costs ~6 ms per program whatever its size, a big
# block also means few programs.
BLOCK = 1024
NUM_WARPS = 4


def launch(kernel):
    """``kernel`` as the registration route must launch it (see the module docstring)."""
    return torch.library.wrap_triton(kernel) if REGISTRATION == "triton_op" else kernel


def define_op(name: str, fake: Callable) -> Callable:
    """Register ``fn`` as the operator ``berdiff_triton::<name>``; ``fake`` gives output metadata
    on the custom_op route (on the triton_op route the body itself is traced with fake tensors)."""
    qualname = f"{NAMESPACE}::{name}"

    def register(fn: Callable):
        if REGISTRATION == "triton_op":
            return torch.library.triton_op(qualname, fn, mutates_args=())
        op = torch.library.custom_op(qualname, fn, mutates_args=())
        op.register_fake(fake)
        return op

    return register


def signed64(v: int) -> int:
    """A key in [0, 2**64) as the int64 with the same bits (what an op schema's ``int`` holds)."""
    v %= 2**64
    return v - 2**64 if v >= 2**63 else v


def split_key(key) -> tuple[int, torch.Tensor | None]:
    """A seed or offset as (int, None) or (0, one-element int64 tensor): the op arguments.

    An int travels as a kernel scalar argument (no host-to-device copy per call); a tensor is
    read by the kernel from device memory, so a CUDA graph can advance it between replays.
    """
    if isinstance(key, torch.Tensor):
        return 0, key
    return signed64(int(key)), None


def key_arg(value: int, tensor: torch.Tensor | None):
    """The kernel argument for a key split by ``split_key``, and whether it is a pointer."""
    return (tensor, True) if tensor is not None else (value, False)


# --- device functions ------------------------------------------------------------------------

@triton.jit
def load_key(seed, offset, SEED_IN_MEM: tl.constexpr, OFFSET_IN_MEM: tl.constexpr):
    """(seed, offset) as int64 scalars, from the scalar arguments or from device memory."""
    if SEED_IN_MEM:
        s = tl.load(seed)
    else:
        s = seed.to(tl.int64)
    if OFFSET_IN_MEM:
        o = tl.load(offset)
    else:
        o = offset.to(tl.int64)
    return s, o


@triton.jit
def uniform(seed, offset, idx):
    """DESIGN §3: element ``idx`` (int64) of the stream (seed, offset) is tl.rand(seed, offset + idx).

    int64 addition wraps modulo 2**64 like the reference's 64-bit counter.
    """
    return tl.rand(seed, offset + idx)


@triton.jit
def sigmoid_pair(l):
    """(sigmoid(l), sigmoid(-l), exp(-|l|)), each accurate in its own tail (no 1 - sigmoid)."""
    z = tl.exp(-tl.abs(l))
    big = 1.0 / (1.0 + z)
    small = z * big
    pos = l >= 0
    return tl.where(pos, big, small), tl.where(pos, small, big), z


@triton.jit
def log1p(x):
    """log(1 + x) for x >= 0, accurate for tiny x (the interpreter has no tl.log1p).

    Goldberg's trick: with u = fl(1 + x), log(u) * x / (u - 1) cancels the rounding of u.
    """
    u = 1.0 + x
    d = u - 1.0
    return tl.where(d == 0.0, x, tl.log(u) * (x / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def load_mask(ptr, idx, m):
    """A binary mask (bool, uint8 or float of any width) as int1. Compared in float32: the
    interpreter mishandles bfloat16 arithmetic; on the GPU the conversion is free."""
    return tl.load(ptr + idx, mask=m, other=0).to(tl.float32) != 0.0


@triton.jit
def store_mask(ptr, idx, bit, m):
    """Store an int1 mask in the pointer's dtype. Through float32: the interpreter cannot cast
    int1 to bfloat16 directly; on the GPU the extra conversion is free."""
    tl.store(ptr + idx, bit.to(tl.float32).to(ptr.dtype.element_ty), mask=m)


@triton.jit
def sample_block(numel_per_sample, BLOCK: tl.constexpr):
    """For a grid of B * cdiv(N, BLOCK) programs: this program's sample b, its flat indices
    (int64) into the (B, N) tensor, and the in-bounds mask."""
    pid = tl.program_id(0).to(tl.int64)
    nblk = tl.cdiv(numel_per_sample, BLOCK)
    b = pid // nblk
    j = (pid % nblk) * BLOCK + tl.arange(0, BLOCK)
    return b, b * numel_per_sample + j, j < numel_per_sample


def per_sample_grid(batch: int, numel_per_sample: int, block: int = BLOCK) -> tuple[int]:
    """One program per block of each sample: blocks never straddle two samples, so every
    program reads its sample's t (and table rows) once, as scalars."""
    return (batch * triton.cdiv(numel_per_sample, block),)
