"""A plain training loop (Algorithm 1) with a time or step budget and a progress bar."""
from __future__ import annotations

import math
import time

import torch

from .model import BerDiff


def batches(dataset, batch_size: int, generator: torch.Generator):
    """Endless random batches {"image", "mask"} from a data set whose items carry both."""
    n = len(dataset)
    if n == 0:
        raise ValueError("dataset: is empty")
    while True:
        for idx in torch.randperm(n, generator=generator).split(batch_size):
            if len(idx) < batch_size and n >= batch_size:
                break  # keep every step's batch shape equal
            items = [dataset[int(i)] for i in idx]
            yield {k: torch.stack([it[k] for it in items]) for k in ("image", "mask")}


def train(model: BerDiff, dataset, *, minutes: float | None = None, max_steps: int | None = None,
          batch_size: int = 32, lr: float = 2e-4, seed: int = 0, progress: bool = True,
          backend: str | None = None) -> dict:
    """Train ``model`` on ``dataset`` (items with "image" (C,H,W) and "mask" (1,H,W)) with AdamW.

    Stops after ``minutes`` of wall time or ``max_steps`` steps, whichever comes first (at least
    one must be given). Returns {"steps", "seconds", "loss"} with the per-step mean losses.
    """
    if minutes is None and max_steps is None:
        raise ValueError("minutes/max_steps: give a time budget, a step budget, or both")
    if minutes is not None and minutes <= 0 or max_steps is not None and max_steps < 1:
        raise ValueError(f"minutes/max_steps: must be positive, got {minutes}, {max_steps}")
    device = model.device
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    deadline = time.monotonic() + 60 * minutes if minutes is not None else math.inf
    steps = max_steps if max_steps is not None else math.inf
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=max_steps, desc="training", unit="step")
    losses, start, step = [], time.monotonic(), 0
    for batch in batches(dataset, batch_size, g):
        if step >= steps or time.monotonic() >= deadline:
            break
        out = model.training_losses(batch["image"].to(device), batch["mask"].to(device), generator=g, backend=backend)
        loss = out["loss"].mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training: loss became {loss.item()} at step {step}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        step += 1
        if bar is not None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    if bar is not None:
        bar.close()
    model.eval()
    return {"steps": step, "seconds": time.monotonic() - start, "loss": losses}
