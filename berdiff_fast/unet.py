"""The ADM U-Net (improved-DDPM's UNetModel, Nichol & Dhariwal 2021) as configured by BerDiff.

Input: concat(y_t, image) with 1 + image_channels channels; output: one logit channel whose
sigmoid is the estimated flip probability eps_hat (Eq. 7). The last convolutions of every
residual block, attention block and of the network are zero-initialised, so a fresh model
predicts eps_hat = 0.5 everywhere. See DESIGN §2 for the released network's figures.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class UNetConfig:
    image_size: int = 128
    image_channels: int = 1
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 3, 4)
    num_res_blocks: int = 2
    attention_ds: tuple[int, ...] = (8,)  # downsample factors with self-attention (128/8 = 16x16)
    num_heads: int = 1
    num_groups: int = 32
    dropout: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unet config: unknown fields {sorted(unknown)}; expected a subset of {sorted(known)}")
        d = dict(d)
        for key in ("channel_mult", "attention_ds"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    def validate(self) -> None:
        levels = len(self.channel_mult)
        if self.image_size % 2 ** (levels - 1):
            raise ValueError(f"image_size: {self.image_size} is not divisible by 2**{levels - 1} "
                             f"(the U-Net downsamples {levels - 1} times)")
        for c in self.channel_mult:
            if (c * self.model_channels) % self.num_groups:
                raise ValueError(f"num_groups: {self.num_groups} does not divide {c * self.model_channels} channels")
        if self.image_channels < 1:
            raise ValueError(f"image_channels: expected >= 1, got {self.image_channels}")


PRESETS: dict[str, UNetConfig] = {
    # The released LIDC network: 85,599,233 parameters.
    "lidc": UNetConfig(),
    # BRATS 2021: 224x224, four MR channels (t1, t1ce, t2, flair). The same backbone as lidc:
    # 224 = 14 * 2**4 so the five levels work, and attention at ds 8 lands on 28x28 tokens
    # (784 per head: cheap with SDPA). Only the first convolution changes (5 input channels).
    "brats": UNetConfig(image_size=224, image_channels=4),
    # CPU tests and the demo: 32x32 images, under 2M parameters.
    "tiny": UNetConfig(image_size=32, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                       attention_ds=(4,), num_groups=8),
}


def preset_config(name: str, **overrides) -> UNetConfig:
    """The U-Net configuration of preset ``name`` with some fields replaced."""
    if name not in PRESETS:
        raise ValueError(f"preset: unknown {name!r}; expected one of {tuple(PRESETS)}")
    return UNetConfig.from_dict({**PRESETS[name].to_dict(), **overrides})


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps: [cos(t f_i), sin(t f_i)], f_i = max_period^(-i / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class GroupNorm32(nn.GroupNorm):
    # Statistics in float32 even under bf16 autocast, as ADM does (float64 models stay float64).
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(torch.promote_types(x.dtype, torch.float32))).to(x.dtype)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, ch: int, emb_dim: int, out_ch: int, groups: int, dropout: float):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(groups, ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_ch))
        self.out_layers = nn.Sequential(GroupNorm32(groups, out_ch), nn.SiLU(), nn.Dropout(dropout),
                                        _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1)))
        self.skip = nn.Identity() if ch == out_ch else nn.Conv2d(ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None].to(h.dtype)
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    def __init__(self, ch: int, num_heads: int, groups: int):
        super().__init__()
        if ch % num_heads:
            raise ValueError(f"num_heads: {num_heads} does not divide {ch} channels")
        self.num_heads = num_heads
        self.norm = GroupNorm32(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj_out = _zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # (B, heads, HW, C/heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Level(nn.ModuleList):
    """A sequence of blocks; residual blocks get the time embedding, the others ignore it."""

    def forward(self, x, emb):
        for block in self:
            x = block(x, emb) if isinstance(block, ResBlock) else block(x)
        return x


class UNet(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        config.validate()
        self.config = config
        mc, groups, drop = config.model_channels, config.num_groups, config.dropout
        emb_dim = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        self.input_blocks = nn.ModuleList([_Level([nn.Conv2d(1 + config.image_channels, mc, 3, padding=1)])])
        skip_chans, ch, ds = [mc], mc, 1
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                blocks = [ResBlock(ch, emb_dim, mult * mc, groups, drop)]
                ch = mult * mc
                if ds in config.attention_ds:
                    blocks.append(AttentionBlock(ch, config.num_heads, groups))
                self.input_blocks.append(_Level(blocks))
                skip_chans.append(ch)
            if level != len(config.channel_mult) - 1:
                self.input_blocks.append(_Level([Downsample(ch)]))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = _Level([ResBlock(ch, emb_dim, ch, groups, drop),
                                    AttentionBlock(ch, config.num_heads, groups),
                                    ResBlock(ch, emb_dim, ch, groups, drop)])

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                blocks = [ResBlock(ch + skip_chans.pop(), emb_dim, mult * mc, groups, drop)]
                ch = mult * mc
                if ds in config.attention_ds:
                    blocks.append(AttentionBlock(ch, config.num_heads, groups))
                if level and i == config.num_res_blocks:
                    blocks.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(_Level(blocks))

        self.out = nn.Sequential(GroupNorm32(groups, ch), nn.SiLU(), _zero(nn.Conv2d(ch, 1, 3, padding=1)))

    def forward(self, y_t: torch.Tensor, image: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """y_t (B,1,H,W), image (B,C,H,W), t (B,) paper time -> logits (B,1,H,W) of eps_hat."""
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(self.time_embed[0].weight.dtype))
        h = torch.cat([y_t.to(image.dtype), image], dim=1)
        skips = []
        for level in self.input_blocks:
            h = level(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for level in self.output_blocks:
            h = level(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class UNetModel(nn.Module):
    """Base of the models built around one U-Net (``self.unet``): their shared properties."""

    unet: UNet

    @property
    def image_size(self) -> int:
        return self.unet.config.image_size

    @property
    def image_channels(self) -> int:
        return self.unet.config.image_channels

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
