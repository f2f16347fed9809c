"""The BerDiff mathematics in plain PyTorch: the specification every kernel is tested against.

Conventions (DESIGN §1):
- masks y are {0, 1}-valued tensors of any float dtype (float64 in tests); y_0 may be soft;
- schedule coefficients arrive already gathered for each sample and shaped to broadcast
  against the masks (e.g. (B, 1, 1, 1)); see ``berdiff_fast.functional`` for the calls that take
  a schedule and paper-time t;
- a function that draws takes its uniforms ``u`` explicitly (from ``berdiff_fast.rng``), and
  a Bernoulli draw with parameter p is ``u < p``.

Notation: a = alpha_t, bh = beta_t / 2, ab = alpha_bar_t, ab_prev = alpha_bar_{t-1},
flip = (1 - alpha_bar) / 2.
"""
from __future__ import annotations

import math

import torch

LN2 = math.log(2.0)


def q_marginal(y0: torch.Tensor, ab_t: torch.Tensor, flip_t: torch.Tensor) -> torch.Tensor:
    """Eq. 3: P(y_t = 1 | y_0) = alpha_bar_t * y_0 + (1 - alpha_bar_t) / 2."""
    return ab_t * y0 + flip_t


def q_sample(y0: torch.Tensor, flip_t: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1: eps ~ B(flip_t) drawn as ``u < flip_t``, y_t = y_0 XOR eps (for binary y_0)."""
    eps = (u < flip_t).to(y0.dtype)
    y_t = (y0 - eps).abs()  # XOR of {0,1} values
    return y_t, eps


def posterior_channels(y_t, y0, a_t, bh_t, ab_prev, flip_prev, y0_c=None):
    """The two unnormalised channels of Eq. 4 (with beta_t / 2, see DESIGN §1):

    n_k = [alpha_t * [1 - y_t, y_t] + beta_t / 2]_k * [alpha_bar_{t-1} * [1 - y_0, y_0] + (1 - alpha_bar_{t-1}) / 2]_k

    Returned as (n0, n1); each is a product of positive factors, so 1 - theta_post = n0 / (n0 + n1)
    is as accurate as theta_post itself. ``y0_c`` is 1 - y_0 when the caller has it more
    accurately than the subtraction would give (a sigmoid's tail).
    """
    if y0_c is None:
        y0_c = 1 - y0
    n0 = (a_t * (1 - y_t) + bh_t) * (ab_prev * y0_c + flip_prev)
    n1 = (a_t * y_t + bh_t) * (ab_prev * y0 + flip_prev)
    return n0, n1


def theta_post(y_t, y0, a_t, bh_t, ab_prev, flip_prev, y0_c=None) -> torch.Tensor:
    """Eq. 4: theta_post(y_t, y_0) = P(y_{t-1} = 1 | y_t, y_0) = Norm(n0, n1)."""
    n0, n1 = posterior_channels(y_t, y0, a_t, bh_t, ab_prev, flip_prev, y0_c)
    return n1 / (n0 + n1)


def predict_y0(y_t: torch.Tensor, eps_prob: torch.Tensor) -> torch.Tensor:
    """Eq. 7, inner part: y0_hat = |y_t - eps_hat|, the mask estimate implied by the flip estimate."""
    return (y_t - eps_prob).abs()


def predict_y0_from_logits(y_t: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 7 from the network's logits, for a binary y_t: (y0_hat, 1 - y0_hat), each taken from
    sigmoid(l) or sigmoid(-l) directly. 1 - sigmoid(l) would round to 0 in float32 for l > 17 and
    zero out the posterior's small channel; these stay exact in both tails."""
    e1, e0 = torch.sigmoid(logits), torch.sigmoid(-logits)
    return y_t * e0 + (1 - y_t) * e1, y_t * e1 + (1 - y_t) * e0


def calibrate(y_t, eps_prob, a_t, bh_t, ab_prev, flip_prev) -> torch.Tensor:
    """Eq. 7: the calibration function mu_hat = F_C(y_t, eps_hat) = theta_post(y_t, |y_t - eps_hat|)."""
    return theta_post(y_t, predict_y0(y_t, eps_prob), a_t, bh_t, ab_prev, flip_prev)


def ddim_prob(y_t, y0_hat, ab_t, flip_t, ab_s, flip_s, eta) -> torch.Tensor:
    """Algorithm 2 (DDIM branch) for a jump t -> s < t:

    sigma = eta * (1 - alpha_bar_s) / (1 - alpha_bar_t)
    p = sigma * y_t + (alpha_bar_s - sigma * alpha_bar_t) * y0_hat
        + ((1 - alpha_bar_s) - (1 - alpha_bar_t) * sigma) / 2

    clamped into [0, 1] (rounding can leave it one ulp outside).
    """
    sigma = eta * flip_s / flip_t
    p = sigma * y_t + (ab_s - sigma * ab_t) * y0_hat + (flip_s - flip_t * sigma)
    return p.clamp(0.0, 1.0)


def bernoulli(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A draw y ~ B(p) from the uniforms u (DESIGN §3): y = (u < p), in p's dtype."""
    return (u < p).to(p.dtype)


def ddpm_step(logits, y_t, a_t, bh_t, ab_prev, flip_prev, u):
    """Algorithm 2 (DDPM branch): y_{t-1} ~ B(mu_hat), mu_hat = theta_post(y_t, y0_hat) (Eq. 7)."""
    y0_hat, y0_hat_c = predict_y0_from_logits(y_t, logits)
    return bernoulli(theta_post(y_t, y0_hat, a_t, bh_t, ab_prev, flip_prev, y0_hat_c), u)


def ddim_step(logits, y_t, ab_t, flip_t, ab_s, flip_s, eta, u):
    """Algorithm 2 (DDIM branch): y_s ~ B(p_ddim(y_t, y0_hat)), y0_hat from the logits (Eq. 7)."""
    y0_hat, _ = predict_y0_from_logits(y_t, logits)
    return bernoulli(ddim_prob(y_t, y0_hat, ab_t, flip_t, ab_s, flip_s, eta), u)


def bernoulli_kl(q0, q1, p0, p1) -> torch.Tensor:
    """KL(B(q) || B(p)) from both channels of each (q0 = 1 - q, ...), in nats; 0 log 0 = 0."""
    return torch.xlogy(q1, q1) - torch.xlogy(q1, p1) + torch.xlogy(q0, q0) - torch.xlogy(q0, p0)


def bce_with_logits(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-[target log sigmoid(l) + (1 - target) log sigmoid(-l)], per element, in nats."""
    # softplus(l) = log(e^0 + e^l), exact in both tails with the right gradient everywhere
    # (torch's softplus returns l itself above 20, an error of e^-20 float64 tests would see).
    return torch.logaddexp(torch.zeros_like(logits), logits) - target * logits


def loss_terms(logits, y_t, y0, is_first, a_t, bh_t, ab_prev, flip_prev) -> dict[str, torch.Tensor]:
    """The training objective (Eqs. 8, 9; DESIGN §1), per sample, in bits.

    logits: (B, ...) network output; eps_hat = sigmoid(logits) estimates eps = y_t XOR y_0.
    is_first: (B,) bool, t == 1, where the KL term is replaced by the decoder NLL
    -log B(y_0; y0_hat). Returns ``kl``, ``bce`` and ``loss = kl + bce`` (lambda = 1), each (B,),
    the per-pixel terms averaged over all non-batch dimensions and divided by ln 2.
    """
    first = is_first.view(-1, *([1] * (logits.ndim - 1)))
    # At t = 1 the KL branch is discarded, but with flip_prev = 0 a saturated logit makes its
    # gradient 0 * inf = NaN through torch.where; any positive flip keeps it finite.
    flip_prev = torch.where(first, 0.5, flip_prev)
    eps = (y_t - y0).abs()
    y0_hat, y0_hat_c = predict_y0_from_logits(y_t, logits)
    q0, q1 = posterior_channels(y_t, y0, a_t, bh_t, ab_prev, flip_prev)
    n0, n1 = posterior_channels(y_t, y0_hat, a_t, bh_t, ab_prev, flip_prev, y0_c=y0_hat_c)  # Eq. 7
    kl = bernoulli_kl(q0 / (q0 + q1), q1 / (q0 + q1), n0 / (n0 + n1), n1 / (n0 + n1))
    bce = bce_with_logits(logits, eps)
    # Decoder NLL at t = 1: -log B(y_0; |y_t - eps_hat|) equals BCE(logits, y_t XOR y_0) exactly.
    kl = torch.where(first, bce_with_logits(logits, eps), kl)
    kl = kl.reshape(kl.shape[0], -1).mean(1) / LN2
    bce = bce.reshape(bce.shape[0], -1).mean(1) / LN2
    return {"kl": kl, "bce": bce, "loss": kl + bce}
