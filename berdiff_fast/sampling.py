"""Sampling: k plausible masks per image, their probability maps, saliency and uncertainty.

The k samples of every image run through the U-Net as one batch (chunked to ``max_batch``
rows to bound memory). Randomness is the shared Philox stream: with n = B * k * H * W
elements per draw, the start y_T uses offsets [0, n) and step i (0-based) uses
[(i + 1) n, (i + 2) n), element j being row-major over (B, k, H, W). Chunking therefore
never changes the result, and every backend gives the same masks for the same seed.
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Literal

import torch

from . import _checks as check
from . import backends
from . import fast as fast_path
from .model import BerDiff

SAMPLERS = ("ddim", "ddpm")
DEFAULT_DDIM_STEPS = 50


@dataclass
class SampleResult:
    """Outputs of :func:`sample` (B images, k samples each).

    masks        (B, k, H, W) bool     the sampled masks, probs > 0.5
    probs        (B, k, H, W) float32  each sample's final y0_hat map (DESIGN §1)
    saliency     (B, H, W)    float32  mean of the k masks: how often a pixel is foreground
    uncertainty  (B, H, W)    float32  per-pixel binary entropy of the k masks, in bits (0..1)
    timesteps    (S,) long             the paper-time steps visited, descending
    seed         int                   the Philox seed used (pass it back to reproduce)
    """

    masks: torch.Tensor
    probs: torch.Tensor
    saliency: torch.Tensor
    uncertainty: torch.Tensor
    timesteps: torch.Tensor
    seed: int

    def to(self, device) -> "SampleResult":
        """The same result with its tensors on ``device`` (e.g. "cpu" before comparing with annotations)."""
        return dataclasses.replace(self, masks=self.masks.to(device), probs=self.probs.to(device),
                                   saliency=self.saliency.to(device), uncertainty=self.uncertainty.to(device),
                                   timesteps=self.timesteps.to(device))


def binary_entropy_bits(p: torch.Tensor) -> torch.Tensor:
    """H(p) = -p log2 p - (1 - p) log2 (1 - p), with 0 log 0 = 0."""
    return -(torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p)) / torch.log(torch.tensor(2.0, dtype=p.dtype))


def _validate(model, x, steps, k, seed, eta, sampler, max_batch):
    if not isinstance(model, BerDiff):
        raise ValueError(f"model: expected a berdiff_fast.BerDiff, got {type(model).__name__}")
    model.check_images(x)
    if not _is_int(k) or k < 1:
        raise ValueError(f"k: expected a positive int (samples per image), got {k!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: unknown {sampler!r}; expected one of {SAMPLERS}")
    T = model.schedule.T
    if sampler == "ddpm" and steps not in (None, T):
        raise ValueError(f"steps: the DDPM sampler visits all T = {T} steps; leave steps at None (or pass {T}), "
                         f"or use sampler='ddim' for a {steps}-step sub-sequence")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**63):
        raise ValueError(f"seed: expected None or an int in [0, 2**63), got {seed!r}")
    if not _is_int(max_batch) or max_batch < 1:
        raise ValueError(f"max_batch: expected a positive int, got {max_batch!r}")
    return check.eta(eta)


def resolve_steps(steps, sampler: str, T: int):
    """The U-Net evaluations a sampler makes: ``steps``, or for None its default (DDIM: 50, at
    most T; DDPM: all T)."""
    if steps is not None:
        return steps
    return T if sampler == "ddpm" else min(DEFAULT_DDIM_STEPS, T)


def _is_int(v) -> bool:
    """Python and NumPy integers; not bools."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


@torch.inference_mode()
def sample(model: BerDiff, x: torch.Tensor, steps: int | None = None, k: int = 16, seed: int | None = None,
           eta: float = 1.0, sampler: Literal["ddim", "ddpm"] = "ddim", *, spacing: str = "even",
           max_batch: int = 256, backend: str | None = None, fast: bool | None = None,
           graph: bool | None = None, dtype: torch.dtype | None = None, progress: bool = False) -> SampleResult:
    """Draw k masks for each image of x (B, C, H, W) with the reverse Bernoulli process (Algorithm 2).

    steps: U-Net evaluations for DDIM (None: 50, or T if T < 50; ``spacing`` "even" or
        "original", see NoiseSchedule.timesteps); DDPM always visits all T steps (None or T).
    eta: DDIM stochasticity in [0, 1] (1, the default, as the released code).
    seed: Philox seed; None draws one from torch's global RNG (reported in the result).
    max_batch: most U-Net rows per forward pass; B * k rows are processed in chunks of it.
    backend: the fused ops' backend (None: automatic, see berdiff_fast.backends).
    fast: the compiled U-Net (and on CUDA the CUDA-graph loop); None = on unless BERDIFF_FAST=0.
        Compiled modules and graphs are cached (berdiff_fast.fast.clear_cache()).
    graph: replay the sampling step as a CUDA graph (None: whenever ``fast`` runs on CUDA).
    dtype: the U-Net's autocast dtype: bfloat16 by default on the fast CUDA path, float32 (no
        autocast) elsewhere; with bfloat16 the masks differ from float32's where a pixel's
        probability lies within bf16 rounding of its uniform draw.
    """
    eta = _validate(model, x, steps, k, seed, eta, sampler, max_batch)
    sched, dev = model.schedule, x.device
    if sampler == "ddpm":
        ts = torch.arange(sched.T, 0, -1)
    else:
        steps = resolve_steps(steps, sampler, sched.T)
        ts = sched.timesteps(int(steps) if _is_int(steps) else steps, spacing)  # NumPy ints too; it checks the rest
    k = int(k)
    seed = int(seed) if seed is not None else None
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    use_fast = fast_path.enabled(fast)
    if dtype is None:
        dtype = torch.bfloat16 if use_fast and dev.type == "cuda" else torch.float32
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype: expected torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    if graph and (not use_fast or dev.type != "cuda"):
        raise ValueError("graph: CUDA-graph replay needs fast=True and CUDA tensors")
    ops = backends.resolve(backend, dev)
    was_training = model.training
    model.eval()
    try:
        net = fast_path.compiled_unet(model, dev) if use_fast else model.unet
        probs = _run(model, net, ops, x, ts, k, seed, eta, sampler, max_batch, dtype,
                     use_graph=use_fast and dev.type == "cuda" and graph is not False, progress=progress)
    finally:
        model.train(was_training)
    B, (H, W) = x.shape[0], x.shape[2:]
    probs = probs.view(B, k, H, W)
    masks = probs > 0.5
    saliency = masks.float().mean(1)
    return SampleResult(masks=masks, probs=probs, saliency=saliency,
                        uncertainty=binary_entropy_bits(saliency), timesteps=ts, seed=seed)


def _run(model, net, ops, x, ts, k, seed, eta, sampler, max_batch, dtype, use_graph, progress) -> torch.Tensor:
    """The sampling loop over row chunks of the (B * k) batch; returns y0_hat (B * k, 1, H, W) float32.

    ``ops`` is a backend module, called without re-validation: the arguments were checked once.
    """
    sched, dev = model.schedule, x.device
    x = x.to(next(model.unet.parameters()).dtype)
    n_rows, (H, W) = x.shape[0] * k, x.shape[2:]  # row r is sample r % k of image r // k
    hw, n_total = H * W, n_rows * H * W
    ts = ts.to(dev)
    targets = torch.cat([ts[1:], ts.new_zeros(1)])
    out = torch.empty(n_rows, 1, H, W, dtype=torch.float32, device=dev)
    n_chunks = -(-n_rows // max_batch)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n_chunks if use_graph else len(ts) * n_chunks, desc="sampling",
                   unit="chunk" if use_graph else "step")
    for lo in range(0, n_rows, max_batch):
        hi = min(lo + max_batch, n_rows)
        xc, n = x.index_select(0, torch.arange(lo, hi, device=dev) // k), hi - lo  # this chunk's rows only
        if use_graph:
            g = fast_path.graph_sampler(model, net, ops, n, tuple(x.shape[1:]), ts, sampler, eta, dtype, dev,
                                        ops.__name__)
            out[lo:hi] = g.run(xc, seed, lo * hw, n_total)
            if bar is not None:
                bar.update(1)
            continue
        y = ops.init_noise((n, 1, H, W), seed, lo * hw, dev, torch.float32)
        for i in range(len(ts)):
            t, s = ts[i].repeat(n), targets[i].repeat(n)
            with fast_path.autocast(dev, dtype):
                logits = net(y, xc, t)
            offset = (i + 1) * n_total + lo * hw
            if i == len(ts) - 1:
                out[lo:hi] = ops.predict_y0(logits, y)
            elif sampler == "ddpm":
                y = ops.ddpm_step(logits, y, t, sched, seed, offset, False)
            else:
                y = ops.ddim_step(logits, y, t, s, sched, seed, offset, eta, False)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return out
