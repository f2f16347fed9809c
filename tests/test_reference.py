"""The reference mathematics against independent derivations (DESIGN §1), in float64."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from berdiff_fast import functional as F
from berdiff_fast import reference, rng
from berdiff_fast.schedule import NoiseSchedule

SCHEDS = {name: NoiseSchedule.from_name(name, 1000) for name in ("linear", "cosine")}
f64 = torch.float64


def bern(y, p):
    """B(y; p) for y in {0, 1}."""
    return p if y == 1 else 1 - p


def step_prob(sched, t):
    """P(y_t = 1 | y_{t-1}) as a function of y_{t-1}, from Eq. 2 and the raw betas."""
    beta = float(sched.betas[t])
    return lambda prev: (1 - beta) * prev + beta / 2


def marginal_by_chain(sched, y0: float, t: int) -> float:
    """P(y_t = 1 | y_0) by running the two-state Markov chain of Eq. 2 for t steps."""
    p1 = y0
    for tau in range(1, t + 1):
        f = step_prob(sched, tau)
        p1 = p1 * f(1) + (1 - p1) * f(0)
    return p1


def posterior_by_bayes(sched, y_t: int, y0: float, t: int) -> float:
    """P(y_{t-1} = 1 | y_t, y_0) by Bayes' rule over the two states of y_{t-1}."""
    prior1 = marginal_by_chain(sched, y0, t - 1)
    f = step_prob(sched, t)
    joint = {v: bern(y_t, f(v)) * (prior1 if v == 1 else 1 - prior1) for v in (0, 1)}
    return joint[1] / (joint[0] + joint[1])


def _one(x, dtype=f64):
    return torch.tensor([[x]], dtype=dtype)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_forward_marginal_closed_form_matches_the_markov_chain(name):
    sched = SCHEDS[name]
    for t in (1, 2, 17, 250, 999, 1000):
        for y0 in (0.0, 1.0):
            chain = marginal_by_chain(sched, y0, t)
            closed = float(reference.q_marginal(_one(y0), sched.alpha_bars[t], sched.flips[t]))
            assert closed == pytest.approx(chain, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@given(t=st.integers(1, 1000), y_t=st.sampled_from([0, 1]), y0=st.floats(0, 1))
def test_theta_post_is_bayes_rule(name, t, y_t, y0):
    sched = SCHEDS[name]
    got = F.theta_post(_one(y_t), _one(y0), torch.tensor([t]), sched).item()
    assert got == pytest.approx(posterior_by_bayes(sched, y_t, y0, t), rel=1e-9, abs=1e-15)


@given(t=st.integers(1, 1000), y_t=st.sampled_from([0, 1]), y0=st.sampled_from([0, 1]))
def test_calibrate_with_the_true_flip_is_the_true_posterior(t, y_t, y0):
    sched = SCHEDS["linear"]
    eps = abs(y_t - y0)
    mu = F.calibrate(_one(y_t), _one(eps), torch.tensor([t]), sched).item()
    assert mu == pytest.approx(posterior_by_bayes(sched, y_t, y0, t), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@given(data=st.data(), eta=st.sampled_from([0.0, 0.3, 1.0]))
def test_ddim_parameter_is_marginally_consistent(name, data, eta):
    """sum_{y_t} q(y_t | y_0) p_ddim(y_s = 1 | y_t, y0_hat = y_0) = q(y_s = 1 | y_0)."""
    sched = SCHEDS[name]
    t = data.draw(st.integers(1, 1000))
    s = data.draw(st.integers(0, t - 1))
    for y0 in (0, 1):
        total = 0.0
        for y_t in (0, 1):
            eps = abs(y_t - y0)  # the prediction is the true flip, so y0_hat = y_0
            p = F.ddim_prob(_one(y_t), _one(eps), torch.tensor([t]), torch.tensor([s]), sched, eta).item()
            total += bern(y_t, marginal_by_chain(sched, y0, t)) * p
        assert total == pytest.approx(marginal_by_chain(sched, y0, s), rel=1e-9, abs=1e-12)


def test_ddim_with_eta_one_and_one_step_jump_keeps_the_current_state_probability():
    # eta = 1: sigma = (1 - ab_s)/(1 - ab_t) and the constant term vanishes (the released code's choice).
    sched = SCHEDS["linear"]
    t, s = torch.tensor([500]), torch.tensor([100])
    p = F.ddim_prob(_one(1.0), _one(0.5), t, s, sched, eta=1.0).item()
    sigma = float(sched.flips[100] / sched.flips[500])
    expect = sigma + (float(sched.alpha_bars[100]) - sigma * float(sched.alpha_bars[500])) * 0.5
    assert p == pytest.approx(expect, rel=1e-12)


@given(t=st.integers(1, 1000), seed=st.integers(0, 2**40))
def test_forward_marginal_by_monte_carlo(t, seed):
    sched = SCHEDS["linear"]
    n = 20000
    y0 = torch.zeros(2, n, dtype=f64)
    y0[1] = 1
    y_t, eps = F.q_sample(y0, torch.tensor([t, t]), sched, seed=seed, backend="torch")
    assert torch.equal(y_t, (y0 - eps).abs())  # y_t = y_0 XOR eps
    for row, y in ((0, 0.0), (1, 1.0)):
        p = marginal_by_chain(sched, y, t)
        freq = y_t[row].mean().item()
        sd = math.sqrt(max(p * (1 - p), 1e-12) / n)
        assert abs(freq - p) < 5 * sd + 1e-9, (t, y, freq, p)  # 5 sigma: false alarm ~ 6e-7


@given(t=st.integers(2, 1000), seed=st.integers(0, 2**31))
def test_kl_is_non_negative_and_vanishes_at_the_true_flip(t, seed):
    sched = SCHEDS["cosine"]
    g = torch.Generator().manual_seed(seed)
    y0 = (torch.rand(3, 1, 5, 7, generator=g) < 0.4).to(f64)
    tt = torch.full((3,), t)
    y_t, eps = F.q_sample(y0, tt, sched, seed=seed, backend="torch")
    logits = torch.randn(3, 1, 5, 7, generator=g, dtype=f64) * 4
    terms = F.loss_terms(logits, y_t, y0, tt, sched)
    assert (terms["kl"] >= -1e-15).all()
    assert torch.allclose(terms["loss"], terms["kl"] + terms["bce"])
    # eps_hat -> eps: logits of +-40 make sigmoid exact to ~1e-17 in float64.
    exact = F.loss_terms(40 * (2 * eps - 1), y_t, y0, tt, sched)
    assert exact["kl"].abs().max() < 1e-12
    assert exact["bce"].abs().max() < 1e-12


def test_decoder_nll_at_t1_is_minus_log_likelihood_of_y0():
    sched = SCHEDS["linear"]
    g = torch.Generator().manual_seed(0)
    y0 = (torch.rand(4, 1, 6, 6, generator=g) < 0.5).to(f64)
    y_t = (torch.rand(4, 1, 6, 6, generator=g) < 0.5).to(f64)
    logits = torch.randn(4, 1, 6, 6, generator=g, dtype=f64) * 3
    terms = F.loss_terms(logits, y_t, y0, torch.ones(4, dtype=torch.long), sched)
    y0_hat = (y_t - torch.sigmoid(logits)).abs()
    nll = -(y0 * y0_hat.log() + (1 - y0) * (1 - y0_hat).log()).mean((1, 2, 3)) / math.log(2)
    assert torch.allclose(terms["kl"], nll, rtol=1e-9)


def test_loss_kl_matches_the_closed_form_kl_of_two_posteriors():
    sched = SCHEDS["linear"]
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([2, 40, 700])
    y0 = (torch.rand(3, 1, 4, 4, generator=g) < 0.5).to(f64)
    y_t = (torch.rand(3, 1, 4, 4, generator=g) < 0.5).to(f64)
    logits = torch.randn(3, 1, 4, 4, generator=g, dtype=f64)
    q = F.theta_post(y_t, y0, t, sched)
    p = F.calibrate(y_t, torch.sigmoid(logits), t, sched)
    kl = (q * (q / p).log() + (1 - q) * ((1 - q) / (1 - p)).log()).mean((1, 2, 3)) / math.log(2)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, (y_t - y0).abs(), reduction="none").mean((1, 2, 3)) / math.log(2)
    terms = F.loss_terms(logits, y_t, y0, t, sched)
    assert torch.allclose(terms["kl"], kl, rtol=1e-9)
    assert torch.allclose(terms["bce"], bce, rtol=1e-9)


def test_loss_is_differentiable_and_matches_fused_torch_loss():
    sched = SCHEDS["linear"]
    g = torch.Generator().manual_seed(2)
    t = torch.tensor([1, 3, 999])
    y0 = (torch.rand(3, 1, 5, 5, generator=g) < 0.5).to(f64)
    y_t = (torch.rand(3, 1, 5, 5, generator=g) < 0.5).to(f64)
    logits = torch.randn(3, 1, 5, 5, generator=g, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda l: F.loss_terms(l, y_t, y0, t, sched)["loss"], (logits,))
    fused = F.loss(logits, y_t, y0, t, sched, backend="torch")
    assert torch.allclose(fused, F.loss_terms(logits, y_t, y0, t, sched)["loss"], rtol=1e-12)


def test_ddpm_and_ddim_steps_draw_with_u_less_than_p():
    sched = SCHEDS["linear"]
    g = torch.Generator().manual_seed(3)
    y_t = (torch.rand(2, 1, 9, 9, generator=g) < 0.5).to(f64)
    logits = torch.randn(2, 1, 9, 9, generator=g, dtype=f64)
    t, s = torch.tensor([10, 800]), torch.tensor([0, 500])
    u = rng.uniform(7, 123, y_t.numel()).view(y_t.shape).to(f64)
    mu = F.calibrate(y_t, torch.sigmoid(logits), t, sched)
    got = F.ddpm_step(logits, y_t, t, sched, 7, 123, backend="torch")
    assert torch.equal(got, (u < mu).to(f64))
    p = F.ddim_prob(y_t, torch.sigmoid(logits), t, s, sched, eta=0.5)
    got = F.ddim_step(logits, y_t, t, s, sched, 7, 123, eta=0.5, backend="torch")
    assert torch.equal(got, (u < p).to(f64))
    _, y0_hat = F.ddim_step(logits, y_t, t, s, sched, 7, 123, eta=0.5, return_y0=True, backend="torch")
    assert torch.allclose(y0_hat, (y_t - torch.sigmoid(logits)).abs())


def test_mask_dtypes_are_preserved():
    sched = SCHEDS["linear"]
    for dtype in (torch.bool, torch.uint8, torch.float32, torch.float64):
        y0 = torch.ones(2, 1, 3, 3, dtype=dtype)
        y_t, eps = F.q_sample(y0, torch.tensor([5, 900]), sched, seed=1, backend="torch")
        assert y_t.dtype == dtype and eps.dtype == dtype
        y_s = F.ddim_step(torch.zeros(2, 1, 3, 3), y_t, torch.tensor([5, 900]), torch.tensor([0, 1]), sched, 1, 0,
                          backend="torch")
        assert y_s.dtype == dtype
