"""Noise schedules: data (float64 tables indexed by paper time) plus a few pure functions.

Paper time runs t = 1..T; every table here has length T + 1 and is indexed by t directly,
with the t = 0 entry describing the clean mask (beta_0 = 0, alpha_bar_0 = 1). That removes the
off-by-one between the paper's t and an array index everywhere downstream.
"""
from __future__ import annotations

import math
from typing import Literal

import torch

ScheduleName = Literal["linear", "cosine"]
Spacing = Literal["even", "original"]
SCHEDULES = ("linear", "cosine")
SPACINGS = ("even", "original")

# Columns of NoiseSchedule.table(): what the kernels (Triton, C++, CUDA) read per timestep.
COL_ALPHA, COL_BETA_HALF, COL_ALPHA_BAR, COL_FLIP = range(4)


def _linear_betas(T: int) -> torch.Tensor:
    # Ho et al.'s range, rescaled so that any T spans the same total noise (the paper's setting).
    scale = 1000.0 / T
    return torch.linspace(1e-4 * scale, 0.02 * scale, T, dtype=torch.float64)


def _cosine_betas(T: int, max_beta: float = 0.999) -> torch.Tensor:
    # Nichol & Dhariwal (2021), Eq. 17, with betas capped at 0.999.
    def f(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1.0 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float64)


class NoiseSchedule:
    """A Bernoulli noise schedule of T steps.

    Attributes (float64, shape (T + 1,), index = paper time t):
        betas        beta_t, with beta_0 = 0
        alphas       alpha_t = 1 - beta_t
        alpha_bars   alpha_bar_t = prod_{tau <= t} alpha_tau, alpha_bar_0 = 1
        beta_halves  beta_t / 2: the one-step flip probability (Eq. 2)
        flips        (1 - alpha_bar_t) / 2: the flip probability of q(y_t | y_0) (Eq. 3)
    """

    def __init__(self, name: str, betas: torch.Tensor):
        if betas.ndim != 1 or len(betas) < 1:
            raise ValueError(f"betas: expected a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas: every beta_t must lie in (0, 1)")
        self.name = name
        self.T = len(betas)
        zero = torch.zeros(1, dtype=torch.float64)
        self.betas = torch.cat([zero, betas.to(torch.float64)])
        self.alphas = 1.0 - self.betas
        self.alpha_bars = torch.cumprod(self.alphas, 0)
        self.beta_halves = self.betas / 2
        # 1 - alpha_bar from the product of alphas loses digits near t = 0 in float32; computing
        # it once here in float64 is why the kernels receive a table rather than alpha_bar alone.
        self.flips = (1.0 - self.alpha_bars) / 2
        self._tables: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_name(cls, name: str, T: int = 1000) -> "NoiseSchedule":
        """``"linear"`` (the paper's) or ``"cosine"`` (the released test configuration's)."""
        if not isinstance(T, int) or isinstance(T, bool) or T < 1:
            raise ValueError(f"T: expected a positive int, got {T!r}")
        if name == "linear":
            if T <= 20:
                raise ValueError(f"T: the linear schedule needs T > 20 (its last beta is 20 / T), got {T}")
            return cls(name, _linear_betas(T))
        if name == "cosine":
            return cls(name, _cosine_betas(T))
        raise ValueError(f"schedule: unknown name {name!r}; expected one of {SCHEDULES}")

    def __repr__(self) -> str:
        return f"NoiseSchedule(name={self.name!r}, T={self.T})"

    def table(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Per-timestep coefficients as one contiguous (T + 1, 4) tensor, cached per device/dtype.

        Columns: alpha_t, beta_t / 2, alpha_bar_t, (1 - alpha_bar_t) / 2 (see COL_* constants).
        """
        key = (str(torch.device(device)), dtype)
        tab = self._tables.get(key)
        if tab is None:
            tab = torch.stack([self.alphas, self.beta_halves, self.alpha_bars, self.flips], dim=1)
            tab = tab.to(device=device, dtype=dtype).contiguous()
            self._tables[key] = tab
        return tab

    def gather(self, t: torch.Tensor, ndim: int, dtype: torch.dtype = torch.float32):
        """(alpha_t, beta_t / 2, alpha_bar_t, (1 - alpha_bar_t) / 2) for each sample of t (B,),
        each shaped (B, 1, ..., 1) with ``ndim`` dimensions to broadcast against the masks."""
        rows = self.table(t.device, dtype)[t]
        shape = (t.shape[0],) + (1,) * (ndim - 1)
        return tuple(rows[:, i].reshape(shape) for i in range(4))

    def timesteps(self, steps: int, spacing: str = "even") -> torch.Tensor:
        """The descending paper-time sub-sequence t_1 > ... > t_S visited by an S-step sampler.

        Each step goes from t_i to t_{i+1}, the last one to t = 0.
        ``"even"``: S values evenly spaced from T down to T/S (T included; S = T gives T..1).
        ``"original"``: the released code's stride T // S, i.e. 1 + (S-1)*stride, ..., 1
        (S = 10, T = 1000: 901, 801, ..., 1), for reproducing its numbers.
        """
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= self.T:
            raise ValueError(f"steps: expected an int in 1..{self.T} (T), got {steps!r}")
        if spacing == "even":
            ts = torch.linspace(self.T, self.T / steps, steps, dtype=torch.float64).round().long()
        elif spacing == "original":
            stride = self.T // steps
            ts = torch.arange(steps - 1, -1, -1, dtype=torch.long) * stride + 1
        else:
            raise ValueError(f"spacing: unknown {spacing!r}; expected one of {SPACINGS}")
        return ts
