"""A one-call training loop with a time or step budget, in memory (no checkpoints or logs).

``train`` is :class:`berdiff_fast.trainer.Trainer` with ``out=None``: the same AdamW step, EMA,
gradient clipping and deterministic data order. For checkpoints, resume, logs and multiple
processes use the Trainer (or ``berdiff-fast train``) directly.
"""
from __future__ import annotations

from .baseline import DeterministicUNet
from .model import BerDiff
from .trainer import Trainer, TrainConfig


def train(model: BerDiff | DeterministicUNet, dataset, *, minutes: float | None = None,
          max_steps: int | None = None, batch_size: int = 32, lr: float = 2e-4, seed: int = 0,
          progress: bool = True, backend: str | None = None, ema_decay: float | None = None,
          grad_clip: float | None = 1.0) -> dict:
    """Train ``model`` on ``dataset`` (items with "image" (C,H,W) and "mask" (1,H,W), or "masks")
    with AdamW until ``minutes`` of wall time or ``max_steps`` steps, whichever comes first (at
    least one must be given).

    With ``ema_decay`` the EMA weights are copied into ``model`` at the end. Returns {"steps",
    "seconds", "loss"} with the per-step mean losses.
    """
    if minutes is None and max_steps is None:
        raise ValueError("minutes/max_steps: give a time budget, a step budget, or both")
    if minutes is not None and minutes <= 0 or max_steps is not None and max_steps < 1:
        raise ValueError(f"minutes/max_steps: must be positive, got {minutes}, {max_steps}")
    cfg = TrainConfig(steps=max_steps, minutes=minutes, batch_size=batch_size, lr=lr, seed=seed,
                      backend=backend, ema_decay=ema_decay, grad_clip=grad_clip, tensorboard="off")
    trainer = Trainer(model, dataset, cfg, out=None, progress=progress, device=model.device)
    hist = trainer.fit()
    if trainer.ema is not None:
        trainer.ema.copy_to(model)
    return {"steps": hist["steps"], "seconds": hist["seconds"], "loss": hist["loss"], "stopped": hist["stopped"]}
