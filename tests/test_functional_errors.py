"""Bad input to the functional API: a ValueError naming the argument, nothing broadcast."""
import pytest
import torch

from berdiff_fast import _checks as check
from berdiff_fast import functional as F
from berdiff_fast import rng
from berdiff_fast.schedule import NoiseSchedule

S = NoiseSchedule.from_name("linear", 100)
Y = torch.ones(2, 1, 4, 4)
T = torch.tensor([3, 50])


def test_rng_stream_is_consistent_under_offsets():
    u = rng.uniform(5, 2**32 - 3, 10)
    assert u.dtype == torch.float32 and ((u >= 0) & (u < 1)).all()
    assert torch.equal(u[4:], rng.uniform(5, 2**32 + 1, 6))  # element i uses offset + i
    assert torch.equal(rng.uniform(5, 0, 10), rng.uniform(torch.tensor([5]), torch.tensor(0), 10))
    assert not torch.equal(rng.uniform(5, 0, 10), rng.uniform(6, 0, 10))


@pytest.mark.parametrize("call, match", [
    (lambda: F.theta_post(Y, Y, torch.tensor([0, 1]), S), "t: values must lie in 1..100"),
    (lambda: F.theta_post(Y, Y, torch.tensor([1, 101]), S), "t: values must lie"),
    (lambda: F.theta_post(Y, Y, torch.tensor([1.0, 2.0]), S), "t: expected an integer"),
    (lambda: F.theta_post(Y, Y, torch.tensor([1]), S), r"t: expected shape \(2,\)"),
    (lambda: F.theta_post(Y, Y[:1], T, S), "shapes must match"),
    (lambda: F.theta_post(Y * 0.5, Y, T, S), "y_t: expected a binary mask"),
    (lambda: F.theta_post(Y, Y * 2, T, S), "y0: expected probabilities"),
    (lambda: F.theta_post(Y, Y, T, "linear"), "sched: expected a NoiseSchedule"),
    (lambda: F.ddim_prob(Y, Y, T, T, S), "s: every s must be smaller"),
    (lambda: F.ddim_prob(Y, Y, T, torch.tensor([-1, 0]), S), "s: values must lie in 0..100"),
    (lambda: F.ddim_prob(Y, Y, T, T - 1, S, eta=1.5), "eta"),
    (lambda: F.ddim_step(Y, Y, T, T - 1, S, 0, 0, eta=-0.1), "eta"),
    (lambda: F.q_sample(Y * 0.3, T, S, seed=0), "y0: expected a binary mask"),
    (lambda: F.q_sample(Y, T, S, seed=-1), "seed"),
    (lambda: F.q_sample(Y, T, S, seed=0, offset=torch.tensor([1, 2])), "offset"),
    (lambda: F.q_sample(Y, T, S, seed=0, backend="magic"), "backend: unknown"),
    (lambda: F.ddpm_step(Y * float("nan"), Y, T, S, 0, 0), "logits: contains NaN"),
    (lambda: F.loss(Y, Y, Y * 0.5, T, S), "y0: expected a binary mask"),
    (lambda: F.predict_y0(Y, Y[0]), "shapes must match"),
    (lambda: F.theta_post(Y, Y.to("meta"), T, S), "different devices"),
    (lambda: F.predict_y0(Y, Y * 0.3), "y_t: expected a binary mask"),
    (lambda: F.predict_y0(Y.long(), Y), "logits.dtype: expected one of"),
    (lambda: F.predict_y0(Y * float("inf"), Y), "logits: contains NaN or inf"),
    (lambda: F.ddim_step(Y.long(), Y, T, T - 1, S, 0, 0), "logits.dtype: expected one of"),
    (lambda: F.q_sample(Y.long(), T, S, seed=0), "y0.dtype: expected one of"),
    (lambda: F.init_noise((2, 2), 0, dtype=torch.int64), "dtype: expected one of"),
    (lambda: F.init_noise((2, 2), 0, dtype=torch.complex64), "dtype: expected one of"),
])
def test_bad_input_is_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_backend_from_environment(monkeypatch):
    monkeypatch.setenv("BERDIFF_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="BERDIFF_BACKEND: unknown backend"):
        F.init_noise((2, 2), 0)
    monkeypatch.setenv("BERDIFF_BACKEND", "torch")
    assert F.init_noise((2, 2), 0).shape == (2, 2)


def test_a_device_without_index_means_the_current_one(monkeypatch):
    # A tensor's device always carries its index: "cuda" must compare equal to "cuda:<current>"
    # (an H100 run found init_noise(device="cuda") rejecting a key tensor on cuda:0).
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert check.canonical_device("cuda") == torch.device("cuda", 3)
    assert check.canonical_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert check.canonical_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="offset: on cpu, but the masks are on cuda:3"):
        check.rng_key("offset", torch.tensor([0]), torch.device("cuda"))
