import math

import pytest
import torch

from berdiff_fast.schedule import NoiseSchedule


def test_linear_schedule_is_the_papers():
    s = NoiseSchedule.from_name("linear", 1000)
    assert s.T == 1000 and s.betas.dtype == torch.float64 and len(s.betas) == 1001
    assert s.betas[0] == 0 and s.alpha_bars[0] == 1
    assert s.betas[1].item() == pytest.approx(1e-4) and s.betas[1000].item() == pytest.approx(0.02)
    assert torch.allclose(s.alpha_bars[1:], torch.cumprod(1 - s.betas[1:], 0), rtol=0, atol=0)
    assert torch.allclose(s.flips, (1 - s.alpha_bars) / 2)
    # Rescaled for other T: the same total noise.
    s100 = NoiseSchedule.from_name("linear", 100)
    assert s100.betas[1].item() == pytest.approx(1e-3) and s100.betas[100].item() == pytest.approx(0.2)


def test_cosine_schedule_follows_improved_ddpm():
    s = NoiseSchedule.from_name("cosine", 1000)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (1, 10, 500, 900):
        assert s.alpha_bars[t].item() == pytest.approx(f(t / 1000) / f(0), rel=1e-9)
    assert s.betas.max().item() <= 0.999


def test_table_columns_and_cache():
    s = NoiseSchedule.from_name("linear", 50)
    tab = s.table("cpu", torch.float32)
    assert tab.shape == (51, 4) and tab.is_contiguous()
    assert torch.allclose(tab[:, 0].double(), s.alphas.float().double())
    assert torch.allclose(tab[:, 3].double(), s.flips.float().double())
    assert s.table("cpu", torch.float32) is tab
    a, bh, ab, fl = s.gather(torch.tensor([3, 7]), 4, torch.float64)
    assert a.shape == (2, 1, 1, 1) and ab[1].item() == s.alpha_bars[7].item()


def test_timesteps_even_and_original():
    s = NoiseSchedule.from_name("linear", 1000)
    ts = s.timesteps(10)
    assert ts.tolist() == [1000, 900, 800, 700, 600, 500, 400, 300, 200, 100]
    assert s.timesteps(10, "original").tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert s.timesteps(1000).tolist() == list(range(1000, 0, -1))
    for steps in (1, 3, 7, 50, 333, 999):
        ts = s.timesteps(steps)
        assert len(ts) == steps and ts[0] == 1000 and (ts[:-1] > ts[1:]).all() and ts[-1] >= 1


@pytest.mark.parametrize("bad", [dict(name="quadratic"), dict(name="linear", T=0), dict(name="linear", T=20), dict(name="linear", T=2.5)])
def test_bad_schedule_arguments(bad):
    with pytest.raises(ValueError, match="schedule|T"):
        NoiseSchedule.from_name(**bad)


def test_bad_timesteps_arguments():
    s = NoiseSchedule.from_name("linear", 100)
    with pytest.raises(ValueError, match="steps"):
        s.timesteps(0)
    with pytest.raises(ValueError, match="steps"):
        s.timesteps(101)
    with pytest.raises(ValueError, match="spacing"):
        s.timesteps(10, "quadratic")
