"""berdiff_fast.rng reproduces Triton's tl.rand(seed, offset + i) bit for bit (DESIGN §3)."""
import os

import pytest
import torch
import triton
import triton.language as tl
from conftest import requires_cuda
from hypothesis import example, given, settings
from hypothesis import strategies as st

from berdiff_fast import rng

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
U64 = st.integers(0, 2**64 - 1)


@triton.jit
def _rand_kernel(out_ptr, seed, offset_ptr, n, BLOCK: tl.constexpr):
    # The offset is read from memory as int64: the same path as a CUDA-graph sampler's.
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    offset = tl.load(offset_ptr)
    tl.store(out_ptr + idx, tl.rand(seed, offset + idx), mask=idx < n)


def _signed(v: int) -> int:
    v %= 2**64
    return v - 2**64 if v >= 2**63 else v


def triton_rand(seed: int, offset: int, n: int, device) -> torch.Tensor:
    out = torch.empty(n, dtype=torch.float32, device=device)
    off = torch.tensor([_signed(offset)], dtype=torch.int64, device=device)
    _rand_kernel[(triton.cdiv(n, 1024),)](out, _signed(seed), off, n, BLOCK=1024)
    return out


def _skip_cpu_without_interpreter(device):
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton runs on CPU only under TRITON_INTERPRET=1")


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=15)
@given(seed=U64, offset=U64, n=st.integers(1, 2100))
@example(seed=0, offset=0, n=1)
@example(seed=1, offset=2**32 - 7, n=20)  # carry into the counter's high word
@example(seed=2**63 - 1, offset=2**63 - 3, n=9)  # the signed int64 boundary of the offset
@example(seed=2**64 - 1, offset=2**64 - 5, n=11)  # the counter wraps modulo 2**64
@example(seed=123456789, offset=5 * 2**40 + 17, n=1025)
def test_uniform_matches_tl_rand(device, seed, offset, n):
    _skip_cpu_without_interpreter(device)
    expected = triton_rand(seed, offset, n, device)
    got = rng.uniform(seed, offset, n, device)
    assert got.dtype == torch.float32 and got.device.type == device
    assert torch.equal(got, expected)
    assert bool(((got >= 0) & (got < 1)).all())


@pytest.mark.parametrize("device", DEVICES)
def test_uniform_accepts_device_keys(device):
    """Seeds and offsets held in int64 tensors give the stream of the same ints."""
    seed, offset = 2**62 + 12345, 2**33 + 1
    expected = rng.uniform(seed, offset, 300, device)
    got = rng.uniform(torch.tensor(seed, device=device), torch.tensor([offset], device=device), 300)
    assert got.device.type == device
    assert torch.equal(got, expected)


def test_streams_concatenate():
    """A stream advances by the count drawn: draws at offset and offset + k tile one long draw."""
    whole = rng.uniform(99, 2**32 - 10, 50)
    assert torch.equal(torch.cat([rng.uniform(99, 2**32 - 10, 20), rng.uniform(99, 2**32 + 10, 30)]), whole)


def test_uniform_like_follows_flat_index():
    x = torch.empty(3, 5, 7)
    assert torch.equal(rng.uniform_like(x, 7, 11).flatten(), rng.uniform(7, 11, x.numel()))
