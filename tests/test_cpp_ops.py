"""The C++ (``cpu``) and CUDA (``cuda``) backends of csrc/ against the float64 reference.

Masks must equal the draws ``u < p`` of the shared Philox stream (berdiff_fast.rng) wherever u is
not within float rounding of p; uniforms, initial draws and noising flips must match exactly.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from berdiff_fast import backends, reference, rng
from berdiff_fast.backends import torch_ref
from berdiff_fast.schedule import NoiseSchedule

from conftest import requires_cuda

if os.environ.get("BERDIFF_NO_EXT") == "1":
    pytest.skip("built with BERDIFF_NO_EXT=1: no C++ extension to test", allow_module_level=True)

from berdiff_fast.backends import cpp  # noqa: E402

CPU = torch.device("cpu")
SCHED = {name: NoiseSchedule.from_name(name, 1000) for name in ("linear", "cosine")}
T = 1000
NEAR = 1e-6  # draws with |u - p| below this may legitimately differ between float paths
MASK_DTYPES = [torch.bool, torch.uint8, torch.float32, torch.bfloat16, torch.float64]
LOGIT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
ISAS = ("default", "avx2", "avx512")


def test_extension_is_built():
    assert cpp.is_available(CPU), "berdiff_fast._C did not load: reinstall with pip install --no-build-isolation -e ."
    assert backends.available("cpu", CPU)
    assert backends.default(CPU) == "cpu"


# --- strategies -------------------------------------------------------------------------------

@st.composite
def problems(draw, ddim=False):
    """Masks, logits and per-sample times of a random shape (sizes 1 and primes included)."""
    batch = draw(st.integers(1, 4))
    tail = draw(st.sampled_from([(1,), (7,), (1, 13, 11), (2, 5, 3), (1, 1, 1), (3, 17)]))
    shape = (batch, *tail)
    seed = draw(st.integers(0, 2**64 - 1))
    offset = draw(st.sampled_from([0, 1, 12345, 2**32 - 7, 2**40 + 3]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([0.5, 3.0, 12.0]))
    logits = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    y_t = (torch.rand(shape, generator=gen) < 0.5).double()
    y0 = (torch.rand(shape, generator=gen) < 0.5).double()
    t = torch.tensor(draw(st.lists(st.sampled_from([1, 2, 3, 57, 500, T - 1, T]) | st.integers(1, T),
                                   min_size=batch, max_size=batch)))
    s = torch.tensor([draw(st.sampled_from([0, int(ti) - 1, int(ti) // 2])) for ti in t.tolist()]).clamp(min=0)
    return dict(logits=logits, y_t=y_t, y0=y0, t=t, s=s, seed=seed, offset=offset,
                sched=SCHED[draw(st.sampled_from(["linear", "cosine"]))])


def _gather(sched, t, ndim):
    return sched.gather(t, ndim, torch.float64)


def _assert_masks(got, p64, u, what):
    """got == (u < p) wherever |u - p| >= NEAR."""
    want = (u.double() < p64)
    far = (u.double() - p64).abs() >= NEAR
    bad = ((got.double() != want.double()) & far).sum().item()
    assert bad == 0, f"{what}: {bad} masks differ from u < p away from p"


# --- uniforms, initial draw, noising ----------------------------------------------------------

@pytest.mark.parametrize("dtype", MASK_DTYPES)
@pytest.mark.parametrize("seed,offset", [(0, 0), (2**64 - 1, 2**64 - 3), (12345, 2**32 - 5), (2**40 + 1, 7)])
def test_init_noise_matches_stream(dtype, seed, offset):
    shape = (3, 1, 37, 5)
    got = cpp.init_noise(shape, seed, offset, CPU, dtype)
    u = rng.uniform(seed, offset, math.prod(shape)).view(shape)
    assert got.dtype == dtype and got.shape == shape
    assert torch.equal(got.double(), (u < 0.5).double())
    assert torch.equal(got, torch_ref.init_noise(shape, seed, offset, CPU, dtype))


def test_init_noise_tensor_keys_and_empty():
    seed, offset = torch.tensor(99), torch.tensor(2**33)
    a = cpp.init_noise((4, 100), seed, offset, CPU, torch.float32)
    assert torch.equal(a, (rng.uniform(99, 2**33, 400) < 0.5).float().view(4, 100))
    assert cpp.init_noise((0, 5), 1, 0, CPU, torch.bool).shape == (0, 5)


def test_uniforms_equal_across_offsets():
    # The draw of n elements at offset k is the tail of the draw at offset k - j.
    full = cpp.init_noise((1, 1000), 5, 2**32 - 500, CPU, torch.uint8)
    tail = cpp.init_noise((1, 600), 5, 2**32 - 100, CPU, torch.uint8)
    assert torch.equal(full[:, 400:], tail)


@given(pb=problems(), dtype=st.sampled_from(MASK_DTYPES))
def test_q_sample(pb, dtype):
    y0, t, sched = pb["y0"].to(dtype), pb["t"], pb["sched"]
    y_t, eps = cpp.q_sample(y0, t, sched, pb["seed"], pb["offset"])
    y_ref, eps_ref = torch_ref.q_sample(y0, t, sched, pb["seed"], pb["offset"])
    assert y_t.dtype == dtype and eps.dtype == dtype
    assert torch.equal(y_t, y_ref) and torch.equal(eps, eps_ref)
    u = rng.uniform_like(y0, pb["seed"], pb["offset"])
    flip = sched.gather(t, y0.ndim, torch.float32)[3]
    assert torch.equal(eps.double(), (u < flip).double())
    assert torch.equal(y_t.double(), (y0.double() - eps.double()).abs())


# --- sampling steps ---------------------------------------------------------------------------

@given(pb=problems(), mask_dtype=st.sampled_from(MASK_DTYPES), logit_dtype=st.sampled_from(LOGIT_DTYPES),
       return_y0=st.booleans())
def test_ddpm_step(pb, mask_dtype, logit_dtype, return_y0):
    logits, y_t, t, sched = pb["logits"].to(logit_dtype), pb["y_t"].to(mask_dtype), pb["t"], pb["sched"]
    out = cpp.ddpm_step(logits, y_t, t, sched, pb["seed"], pb["offset"], return_y0)
    y, y0_hat = out if return_y0 else (out, None)
    assert y.dtype == mask_dtype and y.shape == y_t.shape
    l64, yt64 = logits.double(), y_t.double()
    a_t, bh_t, _, _ = _gather(sched, t, y_t.ndim)
    _, _, ab_p, flip_p = _gather(sched, t - 1, y_t.ndim)
    p = reference.calibrate(yt64, torch.sigmoid(l64), a_t, bh_t, ab_p, flip_p)
    _assert_masks(y, p, rng.uniform_like(y_t, pb["seed"], pb["offset"]), "ddpm")
    ref = torch_ref.ddpm_step(logits, y_t, t, sched, pb["seed"], pb["offset"], False)
    assert ref.dtype == y.dtype
    if return_y0:
        cd = torch.float64 if torch.float64 in (logit_dtype, mask_dtype) else torch.float32
        assert y0_hat.dtype == cd
        tol = 1e-12 if cd == torch.float64 else 1e-6
        torch.testing.assert_close(y0_hat.double(), reference.predict_y0(yt64, torch.sigmoid(l64)), atol=tol, rtol=0)


@given(pb=problems(), mask_dtype=st.sampled_from(MASK_DTYPES), logit_dtype=st.sampled_from(LOGIT_DTYPES),
       eta=st.sampled_from([0.0, 1.0, 0.37]), return_y0=st.booleans())
def test_ddim_step(pb, mask_dtype, logit_dtype, eta, return_y0):
    logits, y_t, t, s, sched = pb["logits"].to(logit_dtype), pb["y_t"].to(mask_dtype), pb["t"], pb["s"], pb["sched"]
    out = cpp.ddim_step(logits, y_t, t, s, sched, pb["seed"], pb["offset"], eta, return_y0)
    y, y0_hat = out if return_y0 else (out, None)
    assert y.dtype == mask_dtype and y.shape == y_t.shape
    l64, yt64 = logits.double(), y_t.double()
    _, _, ab_t, flip_t = _gather(sched, t, y_t.ndim)
    _, _, ab_s, flip_s = _gather(sched, s, y_t.ndim)
    y0_ref = reference.predict_y0(yt64, torch.sigmoid(l64))
    p = reference.ddim_prob(yt64, y0_ref, ab_t, flip_t, ab_s, flip_s, eta)
    _assert_masks(y, p, rng.uniform_like(y_t, pb["seed"], pb["offset"]), "ddim")
    if return_y0:
        tol = 1e-12 if y0_hat.dtype == torch.float64 else 1e-6
        torch.testing.assert_close(y0_hat.double(), y0_ref, atol=tol, rtol=0)


def test_steps_equal_torch_backend_masks():
    """Same seed, same masks as the torch backend, except draws within rounding of p."""
    sched = SCHED["linear"]
    gen = torch.Generator().manual_seed(3)
    shape = (6, 1, 31, 29)
    logits = torch.randn(shape, generator=gen) * 2
    y_t = (torch.rand(shape, generator=gen) < 0.5).float()
    t = torch.tensor([1, 2, 10, 500, 999, 1000])
    s = torch.tensor([0, 0, 9, 250, 0, 900])
    u = rng.uniform_like(y_t, 42, 2**35).double()
    for eta in (0.0, 1.0):
        a = cpp.ddim_step(logits, y_t, t, s, sched, 42, 2**35, eta, False)
        b = torch_ref.ddim_step(logits, y_t, t, s, sched, 42, 2**35, eta, False)
        _, _, ab_t, flip_t = _gather(sched, t, 4)
        _, _, ab_s, flip_s = _gather(sched, s, 4)
        p = reference.ddim_prob(y_t.double(), reference.predict_y0(y_t.double(), torch.sigmoid(logits.double())),
                                ab_t, flip_t, ab_s, flip_s, eta)
        differ = a != b
        assert ((u - p).abs()[differ] < NEAR).all()
    a = cpp.ddpm_step(logits, y_t, t, sched, 42, 2**35, False)
    b = torch_ref.ddpm_step(logits, y_t, t, sched, 42, 2**35, False)
    assert (a != b).sum() <= 2


def test_predict_y0_dtypes():
    y_t = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    logits = torch.tensor([[-40.0, -40.0, 3.0, 0.0]])
    for ld, md, out in [(torch.float32, torch.bool, torch.float32), (torch.bfloat16, torch.uint8, torch.float32),
                        (torch.float64, torch.float32, torch.float64), (torch.float32, torch.float64, torch.float64)]:
        got = cpp.predict_y0(logits.to(ld), y_t.to(md))
        assert got.dtype == out
        want = reference.predict_y0(y_t.double(), torch.sigmoid(logits.to(ld).double()))
        torch.testing.assert_close(got.double(), want, atol=1e-7, rtol=0)


# --- the loss ---------------------------------------------------------------------------------

def _reference_loss(logits, y_t, y0, t, sched):
    l64 = logits.detach().double().requires_grad_()
    ref = torch_ref.loss(l64, y_t.double(), y0.double(), t, sched)
    return ref, l64


@given(pb=problems(), mask_dtype=st.sampled_from(MASK_DTYPES), logit_dtype=st.sampled_from(LOGIT_DTYPES))
def test_loss_and_gradient(pb, mask_dtype, logit_dtype):
    logits = pb["logits"].to(logit_dtype).requires_grad_()
    y_t, y0 = pb["y_t"].to(mask_dtype), pb["y0"].to(mask_dtype)
    got = cpp.loss(logits, y_t, y0, pb["t"], pb["sched"])
    cd = torch.float64 if torch.float64 in (logit_dtype, mask_dtype) else torch.float32
    assert got.shape == (y_t.shape[0],) and got.dtype == cd
    ref, l64 = _reference_loss(logits, y_t, y0, pb["t"], pb["sched"])
    # float64: the reference's softplus is linear beyond l = 20 (torch's threshold), off by up to
    # 2 exp(-20) / ln 2 ~ 6e-9 bits per pixel there.
    tol = dict(rtol=1e-10, atol=1e-8) if cd == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(got.double(), ref.detach(), **tol)
    w = torch.linspace(-1.0, 2.0, got.shape[0], dtype=got.dtype)
    (got * w).sum().backward()
    (ref * w.double()).sum().backward()
    assert logits.grad.dtype == logit_dtype
    scale = l64.grad.abs().max().item()
    if logit_dtype in (torch.bfloat16, torch.float16):
        gtol = dict(rtol=1e-2, atol=1e-2 * scale)
    elif logit_dtype == torch.float64:
        # torch's softplus is linear beyond l = 20 (its threshold), so the reference's derivative
        # there is off by up to exp(-20) ~ 2e-9 per pixel; the kernels use log1p(exp(-|l|)).
        npix = logits[0].numel()
        gtol = dict(rtol=1e-9, atol=1e-12 * scale + 3e-9 * w.abs().max().item() / (npix * math.log(2)))
    else:  # float32: absolute rounding of O(1) per-pixel terms, scaled like the gradient
        npix = logits[0].numel()
        gtol = dict(rtol=1e-4, atol=1e-5 * scale + 2e-7 * w.abs().max().item() / (npix * math.log(2)))
    torch.testing.assert_close(logits.grad.double(), l64.grad, **gtol)


def test_loss_edges():
    """t = 1 (decoder NLL) and t = T, saturated logits, a one-pixel sample."""
    sched = SCHED["linear"]
    logits = torch.tensor([[30.0, -30.0, 0.0], [80.0, -80.0, 1e-3], [5.0, -5.0, 2.0]], dtype=torch.float32)
    y_t = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    y0 = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    t = torch.tensor([1, T, 2])
    lg = logits.clone().requires_grad_()
    got = cpp.loss(lg, y_t, y0, t, sched)
    ref, l64 = _reference_loss(logits, y_t, y0, t, sched)
    torch.testing.assert_close(got.double(), ref.detach(), rtol=2e-5, atol=2e-5)
    got.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(lg.grad.double(), l64.grad, rtol=1e-4, atol=1e-6)
    one = cpp.loss(torch.tensor([[0.3]]), torch.tensor([[1.0]]), torch.tensor([[1.0]]), torch.tensor([T]), sched)
    torch.testing.assert_close(one.double(), torch_ref.loss(torch.tensor([[0.3]], dtype=torch.float64),
                                                            torch.tensor([[1.0]], dtype=torch.float64),
                                                            torch.tensor([[1.0]], dtype=torch.float64),
                                                            torch.tensor([T]), sched), rtol=2e-5, atol=2e-6)


def test_loss_independent_of_thread_count():
    sched = SCHED["cosine"]
    gen = torch.Generator().manual_seed(1)
    shape = (3, 1, 130, 129)  # several fixed-size blocks per sample
    logits = torch.randn(shape, generator=gen)
    y_t = (torch.rand(shape, generator=gen) < 0.5).float()
    y0 = (torch.rand(shape, generator=gen) < 0.5).float()
    t = torch.tensor([1, 40, 1000])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpp.loss(logits, y_t, y0, t, sched)
        torch.set_num_threads(2)
        two = cpp.loss(logits, y_t, y0, t, sched)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


# --- instruction sets -------------------------------------------------------------------------

def test_instruction_sets_agree():
    """Every instruction set this CPU runs gives the same bits (strict IEEE, no FMA contraction)."""
    sched = SCHED["linear"]
    gen = torch.Generator().manual_seed(2)
    shape = (4, 1, 67, 61)
    logits = torch.randn(shape, generator=gen) * 4
    y_t = (torch.rand(shape, generator=gen) < 0.5).float()
    y0 = (torch.rand(shape, generator=gen) < 0.5).float()
    t, s = torch.tensor([1, 3, 600, 1000]), torch.tensor([0, 1, 300, 0])
    active = torch.ops.berdiff.cpu_isa("")
    results = {}
    try:
        for isa in ISAS:
            try:
                torch.ops.berdiff.cpu_isa(isa)
            except RuntimeError:
                continue  # not supported by this CPU
            lg = logits.clone().requires_grad_()
            loss = cpp.loss(lg, y_t, y0, t, sched)
            loss.sum().backward()
            results[isa] = [*cpp.ddim_step(logits, y_t, t, s, sched, 7, 9, 0.5, True),
                            cpp.ddpm_step(logits, y_t, t, sched, 7, 9, False), loss.detach(), lg.grad]
    finally:
        torch.ops.berdiff.cpu_isa(active)
    assert "default" in results
    for isa, res in results.items():
        for a, b in zip(res, results["default"]):
            assert torch.equal(a, b), f"{isa} differs from default"


def test_unknown_isa_rejected():
    with pytest.raises(RuntimeError, match="unknown or unsupported"):
        torch.ops.berdiff.cpu_isa("sse9")


# --- bad input --------------------------------------------------------------------------------

def test_non_contiguous_inputs_are_handled():
    sched = SCHED["linear"]
    gen = torch.Generator().manual_seed(4)
    base_l = torch.randn(2, 1, 9, 7, generator=gen)
    base_y = (torch.rand(2, 1, 9, 7, generator=gen) < 0.5).float()
    l_nc, y_nc = base_l.transpose(2, 3), base_y.transpose(2, 3)
    assert not l_nc.is_contiguous()
    t, s = torch.tensor([5, 9]), torch.tensor([0, 3])
    table = sched.table(CPU, torch.float32)
    key = torch.tensor(3), torch.tensor(4)
    a = torch.ops.berdiff.ddim_step(l_nc, y_nc, t, s, table, *key, 1.0, True)
    b = torch.ops.berdiff.ddim_step(l_nc.contiguous(), y_nc.contiguous(), t, s, table, *key, 1.0, True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    la = torch.ops.berdiff.loss(l_nc, y_nc, y_nc, t, table)
    lb = torch.ops.berdiff.loss(l_nc.contiguous(), y_nc.contiguous(), y_nc.contiguous(), t, table)
    assert torch.equal(la, lb)


def test_bad_input_rejected():
    sched = SCHED["linear"]
    table = sched.table(CPU, torch.float32)
    y = torch.zeros(2, 5)
    l = torch.zeros(2, 5)
    t = torch.tensor([1, 2])
    k = torch.tensor(0)
    ops = torch.ops.berdiff
    with pytest.raises(RuntimeError, match="logits: expected float16, bfloat16, float32 or float64"):
        ops.ddim_step(l.int(), y, t, t - 1, table, k, k, 1.0, False)
    with pytest.raises(RuntimeError, match="y_t: expected a mask"):
        ops.ddpm_step(l, y.int(), t, table, k, k, False)
    with pytest.raises(RuntimeError, match="table: expected the schedule"):
        ops.ddpm_step(l, y, t, table[:, :3], k, k, False)
    with pytest.raises(RuntimeError, match=r"t\[1\] = 1001 is outside 1..1000"):
        ops.ddpm_step(l, y, torch.tensor([1, 1001]), table, k, k, False)
    with pytest.raises(RuntimeError, match=r"t\[0\] = 0 is outside 1..1000"):
        ops.loss(l, y, y, torch.tensor([0, 1]), table)
    with pytest.raises(RuntimeError, match="t: expected shape \\[2\\]"):
        ops.q_sample(y, torch.tensor([1]), table, k, k)
    with pytest.raises(RuntimeError, match="t: expected int64"):
        ops.q_sample(y, t.int(), table, k, k)
    with pytest.raises(RuntimeError, match="seed: expected a one-element int64 tensor"):
        ops.q_sample(y, t, table, torch.tensor([1, 2]), k)
    with pytest.raises(RuntimeError, match="logits: shape"):
        ops.predict_y0(torch.zeros(2, 4), y)
    with pytest.raises(RuntimeError, match="eta: expected a number in \\[0, 1\\]"):
        ops.ddim_step(l, y, t, t - 1, table, k, k, 1.5, False)
    with pytest.raises(RuntimeError, match="out: expected a contiguous tensor"):
        ops.init_noise_(torch.zeros(4, 6).t(), k, k)
    with pytest.raises(RuntimeError, match="grad: expected shape \\[2\\]"):
        ops.loss_backward(torch.ones(3), l, y, y, t, table)
    # The steps and the loss read rows t and t - 1: a one-row table has no T >= 1 (on CUDA, where
    # t is clamped rather than checked, it would be read out of bounds).
    with pytest.raises(RuntimeError, match="table: expected the schedule's \\[T \\+ 1, 4\\] rows with T >= 1"):
        ops.ddpm_step(l, y, t, table[:1], k, k, False)
    with pytest.raises(RuntimeError, match="with T >= 1"):
        ops.loss(l, y, y, t, table[:1])
    assert ops.q_sample(y, torch.tensor([0, 0]), table[:1], k, k)[0].shape == y.shape  # t = 0 needs row 0 only
    with pytest.raises(RuntimeError, match=r"s\[1\] = 2 is not smaller than t\[1\] = 2"):
        ops.ddim_step(l, y, t, torch.tensor([0, 2]), table, k, k, 1.0, False)


def test_bool_outputs_are_0_or_1_even_from_invalid_bool_input():
    # A bool view of bytes equal to 2 is an invalid input; whatever comes out must still be a
    # valid bool (byte 0 or 1), as the CUDA kernels' store gives.
    y0 = torch.full((1, 64), 2, dtype=torch.uint8).view(torch.bool)
    table = SCHED["linear"].table(CPU, torch.float32)
    k = torch.tensor(0)
    y_t, eps = torch.ops.berdiff.q_sample(y0, torch.tensor([500]), table, k, k)
    assert set(y_t.view(torch.uint8).unique().tolist()) <= {0, 1}
    assert set(eps.view(torch.uint8).unique().tolist()) <= {0, 1} and eps.any()


# --- torch.library: opcheck and torch.compile ----------------------------------------------------

def _op_samples():
    sched = SCHED["linear"]
    gen = torch.Generator().manual_seed(5)
    shape = (3, 1, 5, 7)
    l = torch.randn(shape, generator=gen)
    y = (torch.rand(shape, generator=gen) < 0.5).float()
    y0 = (torch.rand(shape, generator=gen) < 0.5).to(torch.uint8)
    t, s = torch.tensor([1, 50, 1000]), torch.tensor([0, 10, 999])
    tab, tab64 = sched.table(CPU, torch.float32), sched.table(CPU, torch.float64)
    k1, k2 = torch.tensor(11), torch.tensor(2**33)
    ops = torch.ops.berdiff
    return [
        (ops.q_sample, (y, t, tab, k1, k2)),
        (ops.q_sample, (y.double(), t, tab64, k1, k2)),
        (ops.init_noise_, (torch.empty(shape), k1, k2)),
        (ops.init_noise_, (torch.empty(shape, dtype=torch.bool), k1, k2)),
        (ops.ddpm_step, (l, y, t, tab, k1, k2, True)),
        (ops.ddpm_step, (l.bfloat16(), y.bool(), t, tab, k1, k2, False)),
        (ops.ddim_step, (l, y, t, s, tab, k1, k2, 0.5, True)),
        (ops.ddim_step, (l.double(), y, t, s, tab64, k1, k2, 1.0, False)),
        (ops.predict_y0, (l, y)),
        (ops.predict_y0, (l.half(), y.double())),
        (ops.loss, (l.clone().requires_grad_(), y, y0, t, tab)),
        (ops.loss, (l.double().requires_grad_(), y, y0, t, tab64)),
        (ops.loss, (l.bfloat16().requires_grad_(), y.bool(), y0, t, tab)),
        (ops.loss_backward, (torch.rand(3), l, y, y0, t, tab)),
    ]


@pytest.mark.parametrize("case", range(len(_op_samples())))
def test_opcheck(case):
    op, args = _op_samples()[case]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    sched = SCHED["linear"]
    gen = torch.Generator().manual_seed(6)
    shape = (2, 1, 16, 16)
    l = torch.randn(shape, generator=gen)
    y = (torch.rand(shape, generator=gen) < 0.5).float()
    y0 = (torch.rand(shape, generator=gen) < 0.5).float()
    t, s = torch.tensor([3, 700]), torch.tensor([1, 300])
    offset = torch.tensor(1000)

    def sample_and_loss(logits, y_t, y_0, offset):
        y_T = cpp.init_noise(y_t.shape, 5, offset, y_t.device, torch.float32)
        y_s, y0_hat = cpp.ddim_step(logits, y_T, t, s, sched, 5, offset, 1.0, True)
        y_p = cpp.ddpm_step(logits, y_s, t, sched, 5, 17, False)
        y_n, _ = cpp.q_sample(y_0, t, sched, 5, 3)
        return y_p, y0_hat, y_n, cpp.predict_y0(logits, y_t), cpp.loss(logits, y_t, y_0, t, sched)

    compiled = torch.compile(sample_and_loss, fullgraph=True)
    lc, le = l.clone().requires_grad_(), l.clone().requires_grad_()
    got = compiled(lc, y, y0, offset)
    want = sample_and_loss(le, y, y0, offset)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    got[-1].sum().backward()
    want[-1].sum().backward()
    assert torch.equal(lc.grad, le.grad)


# --- cross-backend: the Triton interpreter --------------------------------------------------------

@pytest.mark.skipif(not backends.available("triton", CPU), reason="Triton backend (interpreter) not available")
def test_masks_equal_triton_interpreter():
    from berdiff_fast import kernels as triton_backend

    sched = SCHED["linear"]
    gen = torch.Generator().manual_seed(8)
    shape = (2, 1, 11, 13)
    l = torch.randn(shape, generator=gen) * 2
    y = (torch.rand(shape, generator=gen) < 0.5).float()
    t, s = torch.tensor([2, 900]), torch.tensor([1, 100])
    u = rng.uniform_like(y, 21, 2**32 - 50).double()
    assert torch.equal(cpp.init_noise(shape, 21, 2**32 - 50, CPU, torch.float32),
                       triton_backend.init_noise(shape, 21, 2**32 - 50, CPU, torch.float32))
    a = cpp.q_sample(y, t, sched, 21, 2**32 - 50)
    b = triton_backend.q_sample(y, t, sched, 21, 2**32 - 50)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    a = cpp.ddim_step(l, y, t, s, sched, 21, 2**32 - 50, 1.0, False)
    b = triton_backend.ddim_step(l, y, t, s, sched, 21, 2**32 - 50, 1.0, False)
    _, _, ab_t, flip_t = _gather(sched, t, 4)
    _, _, ab_s, flip_s = _gather(sched, s, 4)
    p = reference.ddim_prob(y.double(), reference.predict_y0(y.double(), torch.sigmoid(l.double())),
                            ab_t, flip_t, ab_s, flip_s, 1.0)
    assert ((u - p).abs()[a != b] < NEAR).all()


# --- without the extension ----------------------------------------------------------------------

def test_missing_extension_warns_once_and_falls_back():
    """With berdiff_fast._C unloadable, the cpp backend is off, one warning, torch is the default."""
    code = (
        "import sys, warnings\n"
        "sys.modules['berdiff_fast._C'] = None\n"  # what an absent module looks like to import
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    import torch\n"
        "    from berdiff_fast import backends\n"
        "    cpu = torch.device('cpu')\n"
        "    assert not backends.available('cpu', cpu)\n"
        "    assert not backends.available('cpu', cpu)\n"
        "    assert backends.default(cpu) == 'torch'\n"
        "msgs = [str(x.message) for x in w if 'berdiff_fast._C' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert 'pip install --no-build-isolation' in msgs[0]\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


# --- CUDA ---------------------------------------------------------------------------------------

def _cuda_problem(shape=(5, 1, 67, 71)):
    sched = SCHED["linear"]
    gen = torch.Generator().manual_seed(9)
    l = torch.randn(shape, generator=gen) * 3
    y = (torch.rand(shape, generator=gen) < 0.5).float()
    y0 = (torch.rand(shape, generator=gen) < 0.5).float()
    t, s = torch.tensor([1, 2, 400, 999, 1000]), torch.tensor([0, 1, 200, 500, 0])
    return sched, l, y, y0, t.repeat(shape[0])[:shape[0]], s.repeat(shape[0])[:shape[0]]


# One element; a prime sample size just over one tile (128 threads x 8); 5 samples of 4757
# pixels (no multiple of a tile: the scalar path from the second sample on); 128x128 samples
# (every tile on the vector path); a sample bigger than the grid's 4096 tiles; samples enough
# for a grid of more than 8192 blocks (several tiles per thread: csrc/tile.h, elementwise_blocks).
CUDA_SHAPES = [(1, 1, 1, 1), (3, 1, 1, 1031), (5, 1, 67, 71), (2, 1, 128, 128), (1, 1, 2053, 2053),
               (9001, 1, 1, 1031)]
# (mask dtype, logits dtype): two of the kernel instances with dtypes fixed at compile time (the
# sampler's float32 masks; uint8 masks with bfloat16 logits), and one with neither of those, which
# reads its dtypes at run time (csrc/cuda/berdiff_kernels.cuh, visit_io).
CUDA_IOS = [(torch.float32, torch.float32), (torch.uint8, torch.bfloat16), (torch.bool, torch.float16)]


@requires_cuda
@pytest.mark.parametrize("shape", CUDA_SHAPES)
def test_cuda_noise_matches_cpu_kernels(shape):
    assert cpp.is_available(torch.device("cuda")), "berdiff_fast._C_cuda is not built"
    sched, _, y, y0, t, _ = _cuda_problem(shape)
    dev = torch.device("cuda")
    for dtype in MASK_DTYPES:
        a = cpp.init_noise(y.shape, 13, 2**32 - 9, dev, dtype).cpu()
        assert torch.equal(a, cpp.init_noise(y.shape, 13, 2**32 - 9, CPU, dtype))
        qa = cpp.q_sample(y0.to(dev, dtype), t.to(dev), sched, 13, 2**32 - 9)
        qb = cpp.q_sample(y0.to(dtype), t, sched, 13, 2**32 - 9)
        assert torch.equal(qa[0].cpu(), qb[0]) and torch.equal(qa[1].cpu(), qb[1])


@requires_cuda
@pytest.mark.parametrize("mask_dtype,logit_dtype", CUDA_IOS)
@pytest.mark.parametrize("shape", CUDA_SHAPES)
def test_cuda_steps_and_loss_match_cpu_kernels(shape, mask_dtype, logit_dtype):
    sched, l, y, y0, t, s = _cuda_problem(shape)
    l, y, y0 = l.to(logit_dtype), y.to(mask_dtype), y0.to(mask_dtype)
    dev = torch.device("cuda")
    L, Y, Y0, Tt, S = (x.to(dev) for x in (l, y, y0, t, s))
    u = rng.uniform_like(y, 13, 2**32 - 9).double()
    for eta in (0.0, 1.0):
        a = cpp.ddim_step(L, Y, Tt, S, sched, 13, 2**32 - 9, eta, True)
        b = cpp.ddim_step(l, y, t, s, sched, 13, 2**32 - 9, eta, True)
        assert a[0].dtype == mask_dtype and a[1].dtype == torch.float32
        torch.testing.assert_close(a[1].cpu(), b[1], atol=1e-6, rtol=0)
        _, _, ab_t, flip_t = _gather(sched, t, 4)
        _, _, ab_s, flip_s = _gather(sched, s, 4)
        p = reference.ddim_prob(y.double(), b[1].double(), ab_t, flip_t, ab_s, flip_s, eta)
        assert ((u - p).abs()[a[0].cpu() != b[0]] < 1e-5).all()
    a = cpp.ddpm_step(L, Y, Tt, sched, 13, 2**32 - 9, False).cpu()
    b = cpp.ddpm_step(l, y, t, sched, 13, 2**32 - 9, False)
    assert (a != b).float().mean() < 1e-4
    for ld in (logit_dtype, torch.float64):  # float64: the run-time-dtype instance in double
        la, lb = L.detach().to(ld).requires_grad_(), l.detach().to(ld).requires_grad_()
        fa, fb = cpp.loss(la, Y, Y0, Tt, sched), cpp.loss(lb, y, y0, t, sched)
        torch.testing.assert_close(fa.cpu(), fb, rtol=1e-5, atol=1e-5)
        fa.sum().backward()
        fb.sum().backward()
        low = ld in (torch.bfloat16, torch.float16)
        torch.testing.assert_close(la.grad.cpu().double(), lb.grad.double(), rtol=1e-2 if low else 1e-4, atol=1e-7)
    torch.testing.assert_close(cpp.predict_y0(L, Y).cpu(), cpp.predict_y0(l, y), atol=1e-6, rtol=0)


@requires_cuda
def test_cuda_misaligned_views():
    """Inputs one element past a vector boundary (views into a bigger buffer) give the CPU
    kernels' results: the kernels must fall back to scalar accesses there. (Outputs are always
    fresh, aligned allocations.)"""
    sched, l, y, y0, t, s = _cuda_problem((2, 1, 32, 64))
    dev = torch.device("cuda")

    def shifted(x, dtype):  # x's values, stored one element into a bigger device buffer
        buf = torch.zeros(x.numel() + 1, dtype=dtype, device=dev)
        buf[1:] = x.flatten().to(dtype)
        return buf[1:].view(x.shape)

    for mask_dtype in (torch.uint8, torch.float32):
        L, Y = shifted(l, torch.float32), shifted(y, mask_dtype)
        assert L.data_ptr() % 16 != 0 and Y.data_ptr() % 16 != 0
        a = cpp.ddim_step(L, Y, t.to(dev), s.to(dev), sched, 5, 77, 1.0, True)
        b = cpp.ddim_step(l, y.to(mask_dtype), t, s, sched, 5, 77, 1.0, True)
        assert (a[0].cpu() != b[0]).float().mean() < 1e-3
        torch.testing.assert_close(a[1].cpu(), b[1], atol=1e-6, rtol=0)
        qa, qb = cpp.q_sample(shifted(y0, mask_dtype), t.to(dev), sched, 5, 77), cpp.q_sample(y0.to(mask_dtype), t, sched, 5, 77)
        assert torch.equal(qa[0].cpu(), qb[0]) and torch.equal(qa[1].cpu(), qb[1])
    torch.testing.assert_close(cpp.predict_y0(shifted(l, torch.bfloat16), shifted(y, torch.uint8)).cpu(),
                               cpp.predict_y0(l.bfloat16(), y.to(torch.uint8)), atol=1e-6, rtol=0)


@requires_cuda
def test_cuda_opcheck_and_compile():
    dev = torch.device("cuda")
    for op, args in _op_samples():
        args = tuple(a.to(dev).detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) and
                     a.numel() != 1 else a for a in args)
        torch.library.opcheck(op, args)  # seeds stay on the CPU: read on the host
    sched, l, y, y0, t, s = (x.to(dev) if isinstance(x, torch.Tensor) else x for x in _cuda_problem())
    seed, offset = torch.tensor(3, device=dev), torch.tensor(2**33, device=dev)

    def step(logits, y_t):
        return cpp.ddim_step(logits, y_t, t, s, sched, seed, offset, 1.0, False)

    assert torch.equal(torch.compile(step, fullgraph=True)(l, y), step(l, y))


@requires_cuda
def test_cuda_graph_replay_draws_fresh_numbers():
    """Seed and offset in device memory: each replay draws at the offset it finds there."""
    dev = torch.device("cuda")
    sched, l, y, y0, t, s = (x.to(dev) if isinstance(x, torch.Tensor) else x for x in _cuda_problem())
    seed, offset = torch.tensor(77, device=dev), torch.tensor(0, device=dev)
    out = cpp.ddim_step(l, y, t, s, sched, seed, offset, 1.0, False)  # warm-up
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = cpp.ddim_step(l, y, t, s, sched, seed, offset, 1.0, False)
            noise = cpp.init_noise(y.shape, seed, offset, dev, torch.float32)
    torch.cuda.current_stream().wait_stream(stream)
    draws = []
    for k in range(3):
        offset.fill_(k * y.numel())
        graph.replay()
        torch.cuda.synchronize()
        draws.append(out.clone())
        assert torch.equal(out, cpp.ddim_step(l, y, t, s, sched, 77, k * y.numel(), 1.0, False))
        assert torch.equal(noise.cpu(), (rng.uniform(77, k * y.numel(), y.numel()) < 0.5).float().view(y.shape))
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
