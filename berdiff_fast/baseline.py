"""The deterministic U-Net baseline of the paper's Table 4: BerDiff's backbone, one mask per image.

The network is the same ADM U-Net (``berdiff_fast.unet.UNet``, any preset) with the same single
output channel, trained with binary cross-entropy against the annotation drawn for the image.
Its inputs are the image and a constant noisy-mask channel: y_t = 0 everywhere and t = 0, so
the architecture and the parameter count are exactly BerDiff's (the first convolution keeps
its y_t input channel, which then only ever sees zeros) and the time embedding is a learned
constant. Prediction: p = sigmoid(logit), mask = p > 0.5.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as nnf

from .model import _META_KEY, FORMAT_VERSION, write_safetensors_atomic
from .unet import UNet, UNetConfig, UNetModel, preset_config


class DeterministicUNet(UNetModel):
    """A deterministic segmentation network on BerDiff's backbone.

    Build with ``DeterministicUNet.from_preset("lidc" | "brats" | "tiny", **unet_overrides)``.
    ``forward(image)`` returns mask logits (B, 1, H, W).
    """

    kind = "deterministic_baseline"

    def __init__(self, unet_config: UNetConfig, preset: str | None = None):
        super().__init__()
        self.preset = preset
        self.unet = UNet(unet_config)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DeterministicUNet":
        for key in ("schedule", "T"):
            if key in overrides:
                raise ValueError(f"{key}: the deterministic baseline has no noise schedule")
        return cls(preset_config(name, **overrides), preset=name)

    @property
    def config(self) -> dict:
        return {"format_version": FORMAT_VERSION, "kind": self.kind, "preset": self.preset,
                "unet": self.unet.config.to_dict()}

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Mask logits (B, 1, H, W) for images (B, C, H, W)."""
        b, _, h, w = image.shape
        y_const = image.new_zeros(b, 1, h, w)
        t_const = torch.zeros(b, dtype=torch.long, device=image.device)
        return self.unet(y_const, image, t_const)

    @staticmethod
    def bce(logits: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
        """Per-image binary cross-entropy (B,) in nats, averaged over pixels, from logits."""
        return nnf.binary_cross_entropy_with_logits(logits, y0.to(logits.dtype), reduction="none").flatten(1).mean(1)

    def training_losses(self, x: torch.Tensor, y0: torch.Tensor, **_unused) -> dict[str, torch.Tensor]:
        """{"loss": (B,) BCE in nats} for images x (B,C,H,W) and binary masks y0 (B,1,H,W)."""
        self._check(x)
        if tuple(y0.shape) != (x.shape[0], 1, *x.shape[2:]):
            raise ValueError(f"y0: expected shape {(x.shape[0], 1, *x.shape[2:])}, got {tuple(y0.shape)}")
        return {"loss": self.bce(self(x), y0)}

    def _check(self, x) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ValueError(f"x: expected a (B, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
        c, s = self.image_channels, self.image_size
        if x.shape[1] != c or tuple(x.shape[2:]) != (s, s):
            raise ValueError(f"x: the model takes ({c}, {s}, {s}) images, got {tuple(x.shape[1:])}")

    @torch.inference_mode()
    def predict_proba(self, x: torch.Tensor, max_batch: int = 64) -> torch.Tensor:
        """Foreground probabilities (B, H, W) float32."""
        self._check(x)
        was = self.training
        self.eval()
        try:
            x = x.to(self.device, next(self.parameters()).dtype)
            out = torch.cat([torch.sigmoid(self(x[i:i + max_batch]).float()) for i in range(0, len(x), max_batch)])
        finally:
            self.train(was)
        return out[:, 0]

    def predict(self, x: torch.Tensor, max_batch: int = 64) -> torch.Tensor:
        """One mask per image (B, H, W) bool: sigmoid(logit) > 0.5."""
        return self.predict_proba(x, max_batch) > 0.5

    def save(self, path: str | os.PathLike) -> Path:
        """Weights and config in one ``.safetensors`` file (written atomically)."""
        return write_safetensors_atomic(Path(path), self.state_dict(), {_META_KEY: json.dumps(self.config)})

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> "DeterministicUNet":
        from .trainer import load_model

        model = load_model(path, map_location=map_location)
        if not isinstance(model, cls):
            raise ValueError(f"{path}: holds a BerDiff model, not the deterministic baseline")
        return model
