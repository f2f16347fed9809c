"""BerDiff: the U-Net that estimates the Bernoulli noise, plus its noise schedule."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from . import _checks as check
from . import functional as F
from .schedule import NoiseSchedule
from .unet import UNet, UNetConfig, UNetModel, preset_config

FORMAT_VERSION = 1
_META_KEY = "berdiff_config"


class BerDiff(UNetModel):
    """A conditional Bernoulli diffusion model: ``unet`` maps (y_t, image, t) to flip logits.

    Build with ``BerDiff.from_preset("lidc" | "brats" | "tiny", **overrides)``; overrides are
    U-Net fields (``image_size=64``) or ``schedule``/``T``.
    """

    def __init__(self, unet_config: UNetConfig, schedule: str = "linear", T: int = 1000, preset: str | None = None):
        super().__init__()
        self.preset = preset
        self.unet = UNet(unet_config)
        self.schedule = NoiseSchedule.from_name(schedule, T)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "BerDiff":
        schedule = overrides.pop("schedule", "linear")
        T = overrides.pop("T", 1000)
        return cls(preset_config(name, **overrides), schedule=schedule, T=T, preset=name)

    @property
    def config(self) -> dict:
        return {"format_version": FORMAT_VERSION, "preset": self.preset, "schedule": self.schedule.name,
                "T": self.schedule.T, "unet": self.unet.config.to_dict()}

    def forward(self, y_t: torch.Tensor, image: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Flip logits (B,1,H,W): eps_hat = sigmoid(logits) estimates y_t XOR y_0."""
        return self.unet(y_t, image, t)

    def check_images(self, x, name: str = "x") -> torch.Tensor:
        """Validate a (B, C, H, W) image batch against this model."""
        check.tensor(name, x, ndim=4)
        c, s = self.image_channels, self.image_size
        if x.shape[1] != c:
            raise ValueError(f"{name}: the model takes {c} image channel(s), got {x.shape[1]} (shape {tuple(x.shape)})")
        if tuple(x.shape[2:]) != (s, s):
            raise ValueError(f"{name}: the model takes {s}x{s} images, got {x.shape[2]}x{x.shape[3]}")
        if not x.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point image, got {x.dtype}")
        if x.device != self.device:
            raise ValueError(f"{name}: on {x.device}, but the model is on {self.device}")
        check.finite(name, x)
        return x

    def training_losses(self, x: torch.Tensor, y0: torch.Tensor, *, seed: int | None = None,
                        generator: torch.Generator | None = None, backend: str | None = None) -> dict[str, torch.Tensor]:
        """Algorithm 1 for a batch: t ~ U{1..T} per sample, y_t = y_0 XOR eps, the fused loss.

        x (B,C,H,W) images, y0 (B,1,H,W) binary masks. Returns ``loss`` (B,) in bits and ``t``.
        ``seed`` keys the noise draw (default: drawn from ``generator`` / torch's global RNG).
        """
        self.check_images(x)
        check.tensor("y0", y0, ndim=4)
        if tuple(y0.shape) != (x.shape[0], 1, *x.shape[2:]):
            raise ValueError(f"y0: expected shape {(x.shape[0], 1, *x.shape[2:])}, got {tuple(y0.shape)}")
        check.same_device(x=x, y0=y0)
        B = x.shape[0]
        t = torch.randint(1, self.schedule.T + 1, (B,), generator=generator, device="cpu").to(x.device)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        return {"loss": diffusion_losses(self, self.schedule, x, y0, t, seed, 0, backend=backend), "t": t}

    # --- checkpoints: safetensors weights with the JSON config in the file's metadata -------

    def save(self, path: str | os.PathLike) -> Path:
        """Write weights and config to one ``.safetensors`` file, atomically."""
        return write_safetensors_atomic(Path(path), self.state_dict(), {_META_KEY: json.dumps(self.config)})

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> "BerDiff":
        """Rebuild a model saved by :meth:`save` (or the weights of a training checkpoint, EMA
        when stored), in eval mode. Never unpickles anything."""
        from .trainer import load_model

        model = load_model(path, map_location=map_location)
        if not isinstance(model, cls):
            raise ValueError(f"{path}: holds a {type(model).__name__}, not a BerDiff; "
                             f"load it with berdiff_fast.trainer.load_model")
        return model


def diffusion_losses(net, schedule: NoiseSchedule, x, y0, t, seed, offset=0, *, backend: str | None = None):
    """Algorithm 1 given the timesteps and the noise key: y_t = y_0 XOR eps, then the fused loss.

    ``net(y_t, x, t)`` gives the flip logits (a BerDiff, or a wrapper of its U-Net such as DDP
    or a compiled module); the noise of row i uses the stream from ``offset + i * H * W``, so
    processes that each take a slice of a global batch draw exactly the single-process noise.
    Returns the per-sample loss (B,) in bits, computed in float32 even under autocast.
    """
    y_t, _ = F.q_sample(y0, t, schedule, seed, offset, backend=backend)
    logits = net(y_t, x, t)
    return F.loss(logits.float(), y_t, y0, t, schedule, backend=backend)


def write_safetensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write ``tensors`` to ``path`` via a temporary file in the same folder, fsync, os.replace.

    A reader sees either the previous file or the complete new one, even if the process is killed
    while writing."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # persist the rename itself
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, state_dict) of a berdiff-fast safetensors checkpoint, with errors naming the file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise ValueError(f"{path}: not a readable safetensors checkpoint (corrupt or truncated?): {e}") from e
    if _META_KEY not in meta:
        raise ValueError(f"{path}: a safetensors file without berdiff-fast config metadata")
    try:
        config = json.loads(meta[_META_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the stored config is not valid JSON: {e}") from e
    return config, state
