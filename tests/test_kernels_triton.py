"""The Triton backend against the float64 reference and the torch backend (DESIGN §1, §3).

On CPU the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1), which
costs ~6 ms per program: shapes stay small (a block is 1024 elements), yet include sizes 1,
primes and sizes above one block that are no multiple of it.
"""
import math

import pytest
import torch
from conftest import requires_cuda
from hypothesis import example, given, settings
from hypothesis import strategies as st

from berdiff_fast import functional as F
from berdiff_fast import kernels as K
from berdiff_fast import rng
from berdiff_fast.backends import available
from berdiff_fast.schedule import NoiseSchedule

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
SCHEDULES = {
    "linear": NoiseSchedule.from_name("linear", 1000),
    "cosine": NoiseSchedule.from_name("cosine", 1000),
    "short": NoiseSchedule.from_name("cosine", 4),
}
MASK_DTYPES = [torch.bool, torch.uint8, torch.float32, torch.bfloat16, torch.float64]
LOGIT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# Draws whose uniform lies this close to p may differ between backends (float rounding of p).
NEAR = 1e-6
# (rtol, atol) of each logits dtype for values computed in float32 from the exact inputs;
# a gradient is stored in the logits' dtype, so its tolerance is that dtype's.
VALUE_TOL = (1e-5, 2e-6)
GRAD_TOL = {torch.float32: (1e-4, 1e-6), torch.float64: (1e-4, 1e-6),
            torch.float16: (2e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-4)}


def _needs_triton(device: str) -> torch.device:
    dev = torch.device(device)
    if not available("triton", dev):
        pytest.skip(f"the triton backend cannot run on {device} here (CPU needs TRITON_INTERPRET=1)")
    return dev


@st.composite
def batches(draw, max_numel: int = 2100):
    """(schedule, shape, t): B in 1..4, up to three trailing dims, t mixing edges and interior."""
    sched = SCHEDULES[draw(st.sampled_from(sorted(SCHEDULES)))]
    batch = draw(st.integers(1, 4))
    budget = max_numel // batch
    ndims = draw(st.integers(0, 3))
    dims = []
    for _ in range(ndims):
        d = draw(st.integers(1, max(1, budget if ndims == 1 else min(41, budget))))
        dims.append(d)
        budget = max(1, budget // d)
    edge = st.sampled_from([1, 2, sched.T - 1, sched.T]).map(lambda v: min(max(v, 1), sched.T))
    t = draw(st.lists(edge | st.integers(1, sched.T), min_size=batch, max_size=batch))
    return sched, (batch, *dims), t


@st.composite
def keys(draw):
    """(seed, offset), each a Python int or a one-element int64 tensor (marked by a flag)."""
    seed = draw(st.integers(0, 2**64 - 1))
    offset = draw(st.sampled_from([0, 2**32 - 3, 2**63 - 2, 2**64 - 5]) | st.integers(0, 2**64 - 1))
    as_tensor = draw(st.tuples(st.booleans(), st.booleans()))
    return seed, offset, as_tensor


def _key(value: int, as_tensor: bool, device):
    if not as_tensor:
        return value
    signed = value - 2**64 if value >= 2**63 else value
    return torch.tensor([signed], dtype=torch.int64, device=device)


def _masks(shape, dtype, gen, device, p=0.5):
    return (torch.rand(shape, generator=gen) < p).to(dtype).to(device)


def _logits(shape, dtype, gen, device, scale):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)


def _assert_draws(got, p64, u, expected_other=None):
    """got == (u < p64) wherever |u - p64| >= NEAR; the same for another backend's masks."""
    far = (u.double() - p64).abs() >= NEAR
    want = u.double() < p64
    assert torch.equal(got.double()[far] != 0, want[far])
    if expected_other is not None:
        assert torch.equal(got[far], expected_other[far])


# --- noising and the initial draw --------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=12)
@given(case=batches(), key=keys(), dtype=st.sampled_from(MASK_DTYPES), gen_seed=st.integers(0, 2**31))
@example(case=(SCHEDULES["linear"], (2, 1031), [1, 1000]), key=(5, 2**32 - 3, (False, True)),
         dtype=torch.uint8, gen_seed=0)
def test_q_sample_matches_torch_backend(device, case, key, dtype, gen_seed):
    dev = _needs_triton(device)
    sched, shape, t = case
    seed, offset, as_tensor = key
    gen = torch.Generator().manual_seed(gen_seed)
    y0 = _masks(shape, dtype, gen, dev)
    t = torch.tensor(t, device=dev)
    args = (y0, t, sched, _key(seed, as_tensor[0], dev), _key(offset, as_tensor[1], dev))
    y_t, eps = F.q_sample(*args, backend="triton")
    y_t_ref, eps_ref = F.q_sample(*args, backend="torch")
    assert y_t.dtype == dtype and eps.dtype == dtype and y_t.shape == y0.shape
    # p = flip_t is the same float32 table entry on both backends: no rounding exemption.
    assert torch.equal(eps, eps_ref) and torch.equal(y_t, y_t_ref)
    assert torch.equal(y_t.bool(), y0.bool() ^ eps.bool())


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=10)
@given(shape=st.lists(st.integers(0, 1100), min_size=1, max_size=2).filter(lambda s: math.prod(s) <= 2200),
       key=keys(), dtype=st.sampled_from(MASK_DTYPES))
@example(shape=[1], key=(0, 0, (False, False)), dtype=torch.float32)
def test_init_noise_matches_torch_backend(device, shape, key, dtype):
    dev = _needs_triton(device)
    seed, offset, as_tensor = key
    args = (shape, _key(seed, as_tensor[0], dev), _key(offset, as_tensor[1], dev))
    y = F.init_noise(*args, device=dev, dtype=dtype, backend="triton")
    expected = F.init_noise(*args, device=dev, dtype=dtype, backend="torch")
    assert y.dtype == dtype and tuple(y.shape) == tuple(shape) and y.device.type == dev.type
    assert torch.equal(y, expected)


# --- one sampling step ------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=10)
@given(case=batches(), logit_dtype=st.sampled_from(LOGIT_DTYPES), mask_dtype=st.sampled_from(MASK_DTYPES),
       scale=st.sampled_from([0.5, 3.0, 25.0]), gen_seed=st.integers(0, 2**31))
def test_predict_y0_matches_reference(device, case, logit_dtype, mask_dtype, scale, gen_seed):
    dev = _needs_triton(device)
    _, shape, _ = case
    gen = torch.Generator().manual_seed(gen_seed)
    logits, y_t = _logits(shape, logit_dtype, gen, dev, scale), _masks(shape, mask_dtype, gen, dev)
    logits.requires_grad_()
    got = F.predict_y0(logits, y_t, backend="triton")
    assert got.dtype == (torch.float64 if torch.float64 in (logit_dtype, mask_dtype) else torch.float32)
    logits64 = logits.detach().double().requires_grad_()
    expected = (y_t.double() - torch.sigmoid(logits64)).abs()
    torch.testing.assert_close(got.double(), expected.detach(), rtol=VALUE_TOL[0], atol=VALUE_TOL[1])
    upstream = torch.randn(shape, generator=gen, dtype=torch.float64).to(dev)
    (grad,) = torch.autograd.grad((got.double() * upstream).sum(), logits)
    (grad_ref,) = torch.autograd.grad((expected * upstream).sum(), logits64)
    assert grad.dtype == logit_dtype
    torch.testing.assert_close(grad.double(), grad_ref, rtol=GRAD_TOL[logit_dtype][0], atol=GRAD_TOL[logit_dtype][1])


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=14)
@given(case=batches(), key=keys(), logit_dtype=st.sampled_from(LOGIT_DTYPES),
       mask_dtype=st.sampled_from(MASK_DTYPES), scale=st.sampled_from([0.5, 3.0, 25.0]),
       return_y0=st.booleans(), gen_seed=st.integers(0, 2**31))
@example(case=(SCHEDULES["linear"], (3, 1, 7, 53), [1, 2, 1000]), key=(7, 2**32 - 3, (True, False)),
         logit_dtype=torch.float32, mask_dtype=torch.bool, scale=3.0, return_y0=True, gen_seed=1)
def test_ddpm_step_matches_reference(device, case, key, logit_dtype, mask_dtype, scale, return_y0, gen_seed):
    dev = _needs_triton(device)
    sched, shape, t = case
    seed, offset, as_tensor = key
    gen = torch.Generator().manual_seed(gen_seed)
    logits, y_t = _logits(shape, logit_dtype, gen, dev, scale), _masks(shape, mask_dtype, gen, dev)
    t = torch.tensor(t, device=dev)
    args = (logits, y_t, t, sched, _key(seed, as_tensor[0], dev), _key(offset, as_tensor[1], dev))
    out = F.ddpm_step(*args, return_y0=return_y0, backend="triton")
    ref = F.ddpm_step(*args, return_y0=return_y0, backend="torch")
    y_prev, y0_hat = out if return_y0 else (out, None)
    assert y_prev.dtype == mask_dtype and y_prev.shape == y_t.shape
    eps_hat = torch.sigmoid(logits.double())
    p64 = F.calibrate(y_t.double(), eps_hat, t, sched)  # Eq. 7 in float64
    u = rng.uniform_like(y_t, seed, offset)
    _assert_draws(y_prev, p64, u, ref[0] if return_y0 else ref)
    if return_y0:
        assert y0_hat.dtype == ref[1].dtype
        torch.testing.assert_close(y0_hat.double(), (y_t.double() - eps_hat).abs(),
                                   rtol=VALUE_TOL[0], atol=VALUE_TOL[1])


@st.composite
def jumps(draw):
    """A batch plus per-sample DDIM targets 0 <= s < t (edges s = 0 and s = t - 1 included)."""
    sched, shape, t = draw(batches())
    s = [draw(st.sampled_from([0, ti - 1]) | st.integers(0, ti - 1)) for ti in t]
    return sched, shape, t, s


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=14)
@given(case=jumps(), key=keys(), eta=st.sampled_from([0.0, 1.0]) | st.floats(0.0, 1.0),
       logit_dtype=st.sampled_from(LOGIT_DTYPES), mask_dtype=st.sampled_from(MASK_DTYPES),
       scale=st.sampled_from([0.5, 3.0, 25.0]), return_y0=st.booleans(), gen_seed=st.integers(0, 2**31))
@example(case=(SCHEDULES["cosine"], (4, 1031), [1000, 1000, 2, 1], [0, 999, 1, 0]),
         key=(2**64 - 1, 2**64 - 5, (False, False)), eta=0.0, logit_dtype=torch.bfloat16,
         mask_dtype=torch.float32, scale=3.0, return_y0=True, gen_seed=2)
def test_ddim_step_matches_reference(device, case, key, eta, logit_dtype, mask_dtype, scale, return_y0, gen_seed):
    dev = _needs_triton(device)
    sched, shape, t, s = case
    seed, offset, as_tensor = key
    gen = torch.Generator().manual_seed(gen_seed)
    logits, y_t = _logits(shape, logit_dtype, gen, dev, scale), _masks(shape, mask_dtype, gen, dev)
    t, s = torch.tensor(t, device=dev), torch.tensor(s, device=dev)
    args = (logits, y_t, t, s, sched, _key(seed, as_tensor[0], dev), _key(offset, as_tensor[1], dev), eta)
    out = F.ddim_step(*args, return_y0=return_y0, backend="triton")
    ref = F.ddim_step(*args, return_y0=return_y0, backend="torch")
    y_s, y0_hat = out if return_y0 else (out, None)
    assert y_s.dtype == mask_dtype and y_s.shape == y_t.shape
    eps_hat = torch.sigmoid(logits.double())
    p64 = F.ddim_prob(y_t.double(), eps_hat, t, s, sched, eta)  # Algorithm 2 in float64
    _assert_draws(y_s, p64, rng.uniform_like(y_t, seed, offset), ref[0] if return_y0 else ref)
    if return_y0:
        torch.testing.assert_close(y0_hat.double(), (y_t.double() - eps_hat).abs(),
                                   rtol=VALUE_TOL[0], atol=VALUE_TOL[1])


@pytest.mark.parametrize("device", DEVICES)
def test_device_keys_equal_int_keys(device):
    """A seed/offset read from device memory draws exactly what the same ints draw."""
    dev = _needs_triton(device)
    sched = SCHEDULES["linear"]
    gen = torch.Generator().manual_seed(3)
    logits, y_t = _logits((2, 700), torch.float32, gen, dev, 2.0), _masks((2, 700), torch.uint8, gen, dev)
    t, s = torch.tensor([500, 20], device=dev), torch.tensor([400, 0], device=dev)
    seed, offset = 2**63 + 11, 2**32 - 100
    dev_seed = torch.tensor([seed - 2**64], device=dev)
    dev_offset = torch.tensor([offset], device=dev)
    ints = F.ddim_step(logits, y_t, t, s, sched, seed, offset, 0.5, backend="triton")
    tensors = F.ddim_step(logits, y_t, t, s, sched, dev_seed, dev_offset, 0.5, backend="triton")
    assert torch.equal(ints, tensors)
    # A different offset is a different draw (the key is really read).
    moved = F.ddim_step(logits, y_t, t, s, sched, dev_seed, dev_offset + 1400, 0.5, backend="triton")
    assert not torch.equal(ints, moved)


@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_and_empty_inputs(device):
    dev = _needs_triton(device)
    sched = SCHEDULES["linear"]
    gen = torch.Generator().manual_seed(4)
    logits = _logits((3, 40, 2), torch.float32, gen, dev, 2.0).transpose(1, 2)
    y_t = _masks((3, 40, 2), torch.float32, gen, dev).transpose(1, 2)
    t = torch.tensor([1, 2, 999], device=dev)
    assert not logits.is_contiguous()
    got = F.ddpm_step(logits, y_t, t, sched, 1, 2, backend="triton")
    assert torch.equal(got, F.ddpm_step(logits.contiguous(), y_t.contiguous(), t, sched, 1, 2, backend="triton"))
    empty = torch.empty(2, 0, device=dev)
    t2 = torch.tensor([1, 5], device=dev)
    y_t0, eps0 = F.q_sample(empty, t2, sched, 1, 0, backend="triton")
    assert y_t0.shape == (2, 0) and eps0.shape == (2, 0)
    assert F.ddpm_step(empty, empty, t2, sched, 1, 0, backend="triton").shape == (2, 0)
    assert F.init_noise((0, 3), 1, 0, device=dev, backend="triton").shape == (0, 3)
    none = torch.empty(0, 3, device=dev)
    assert F.loss(none, none, none, torch.empty(0, dtype=torch.long, device=dev), sched,
                  backend="triton").shape == (0,)


# --- the loss ------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=14)
@given(case=batches(), logit_dtype=st.sampled_from(LOGIT_DTYPES), mask_dtype=st.sampled_from(MASK_DTYPES),
       scale=st.sampled_from([0.5, 3.0, 25.0]), gen_seed=st.integers(0, 2**31))
@example(case=(SCHEDULES["linear"], (4, 1031), [1, 2, 999, 1000]), logit_dtype=torch.float64,
         mask_dtype=torch.uint8, scale=3.0, gen_seed=5)
def test_loss_and_gradient_match_autograd_reference(device, case, logit_dtype, mask_dtype, scale, gen_seed):
    dev = _needs_triton(device)
    sched, shape, t = case
    gen = torch.Generator().manual_seed(gen_seed)
    logits = _logits(shape, logit_dtype, gen, dev, scale).requires_grad_()
    y_t, y0 = _masks(shape, mask_dtype, gen, dev), _masks(shape, mask_dtype, gen, dev, p=0.3)
    t = torch.tensor(t, device=dev)
    upstream = torch.randn(shape[0], generator=gen, dtype=torch.float64).to(dev)

    loss = F.loss(logits, y_t, y0, t, sched, backend="triton")
    assert loss.shape == (shape[0],)
    assert loss.dtype == (torch.float64 if torch.float64 in (logit_dtype, mask_dtype) else torch.float32)
    (grad,) = torch.autograd.grad((loss.double() * upstream).sum(), logits)
    assert grad.dtype == logit_dtype

    logits64 = logits.detach().double().requires_grad_()
    # As (B, N): reference.loss_terms reduces a 1-D (B,) input to a scalar (mean over dims ()).
    flat = (shape[0], -1)
    ref = F.loss_terms(logits64.reshape(flat), y_t.double().reshape(flat), y0.double().reshape(flat),
                       t, sched)["loss"]
    (grad_ref,) = torch.autograd.grad((ref * upstream).sum(), logits64)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=VALUE_TOL[0], atol=VALUE_TOL[1] * 10)
    # Per-pixel gradients carry the 1 / (pixels * ln 2) of the mean: compare them unscaled.
    npix = logits[0].numel()
    rtol, atol = GRAD_TOL[logit_dtype]
    torch.testing.assert_close(grad.double() * npix, grad_ref * npix, rtol=rtol, atol=atol * 10)


# --- registration --------------------------------------------------------------------------------

def _op_samples(dev):
    """(op, args) for every registered op, covering int keys, device keys and both step modes."""
    ops = torch.ops.berdiff_triton
    sched = SCHEDULES["linear"]
    table = sched.table(dev, torch.float32)
    gen = torch.Generator().manual_seed(6)
    y = _masks((2, 3, 5), torch.uint8, gen, dev)
    yf = _masks((2, 3, 5), torch.float32, gen, dev)
    logits = _logits((2, 3, 5), torch.float32, gen, dev, 2.0)
    # y0_hat and the loss are differentiable in the logits. (opcheck's autograd test sums every
    # output, which fails for integer masks: those samples keep logits without grad.)
    lg = logits.clone().requires_grad_()
    t, s = torch.tensor([1, 700], device=dev), torch.tensor([0, 350], device=dev)
    seed_t, offset_t = torch.tensor([9], device=dev), torch.tensor([2**32 + 1], device=dev)
    grad = torch.randn(2, generator=gen).to(dev)
    return [
        (ops.q_sample.default, (y, t, table, 3, 2**33, None, None)),
        (ops.q_sample.default, (yf, t, table, 0, 0, seed_t, offset_t)),
        (ops.init_noise.default, ([4, 7], torch.bool, dev, 3, 5, None, None)),
        (ops.init_noise.default, ([4, 7], torch.float32, dev, 0, 0, seed_t, offset_t)),
        (ops.ddpm_step.default, (lg, yf, t, table, 3, 5, None, None, True)),
        (ops.ddpm_step.default, (logits, y, t, table, 0, 0, seed_t, offset_t, False)),
        (ops.ddim_step.default, (lg, yf, t, s, table, 1.0, 3, 5, None, None, True)),
        (ops.ddim_step.default, (logits, y, t, s, table, 0.3, 0, 5, seed_t, None, False)),
        (ops.predict_y0.default, (lg, y)),
        (ops.loss.default, (lg, y, yf, t, table)),
        (ops.loss_backward.default, (grad, logits, y, yf, t, table)),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_every_op(device):
    dev = _needs_triton(device)
    samples = _op_samples(dev)
    assert {op.name().split("::")[1] for op, _ in samples} == {
        "q_sample", "init_noise", "ddpm_step", "ddim_step", "predict_y0", "loss", "loss_backward"}
    for op, args in samples:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


@pytest.mark.parametrize("device", DEVICES)
def test_compiles_fullgraph(device):
    """A training-and-sampling function calling the backend's ops compiles without a graph
    break, and its forward and backward equal eager execution."""
    dev = _needs_triton(device)
    sched = SCHEDULES["cosine"]
    gen = torch.Generator().manual_seed(7)
    y0 = _masks((2, 1, 6, 6), torch.float32, gen, dev)
    logits = _logits((2, 1, 6, 6), torch.float32, gen, dev, 2.0)
    t, s = torch.tensor([1, 400], device=dev), torch.tensor([0, 100], device=dev)
    offset = torch.tensor([2**32 - 50], device=dev)

    def fn(logits, y0, t, s, offset):
        y_t, eps = K.q_sample(y0, t, sched, 11, offset)
        loss = K.loss(logits * 1.5, y_t, y0, t, sched)
        y_prev = K.ddpm_step(logits, y_t, t, sched, 11, offset + 72, False)
        y_s, y0_hat = K.ddim_step(logits, y_prev, t, s, sched, 2**64 - 1, offset + 144, 0.5, True)
        start = K.init_noise((2, 3), 11, 5, y0.device, torch.bool)
        return loss, y_t, eps, y_prev, y_s, y0_hat + K.predict_y0(logits, y_s), start

    compiled = torch.compile(fn, fullgraph=True)
    l_eager = logits.clone().requires_grad_()
    l_comp = logits.clone().requires_grad_()
    eager = fn(l_eager, y0, t, s, offset)
    got = compiled(l_comp, y0, t, s, offset)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    eager[0].sum().backward()
    got[0].sum().backward()
    torch.testing.assert_close(l_comp.grad, l_eager.grad, rtol=1e-6, atol=1e-8)
    assert l_comp.grad.abs().sum() > 0
